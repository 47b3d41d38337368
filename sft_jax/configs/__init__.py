"""The base config shipped with the package: `from sft_jax.configs import base`.

Config files anywhere (a user's own project, not only this repository's configs/) start from
`base.get_config()` and override a few keys; base.py is the one place every default lives.
"""
