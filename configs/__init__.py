"""Example configs. The base config lives in the package (sft_jax/configs/base.py); importing it
here keeps `from configs import base` working for config files written before it moved."""

from sft_jax.configs import base  # noqa: F401
