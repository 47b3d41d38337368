"""The path layer moved to `sft_jax.paths` (the workdir uses it too); this name is kept so that
imports of `sft_jax.data.paths` keep working."""

from sft_jax.paths import glob_files, is_url, isdir, isfile, open_binary, open_text

__all__ = ["glob_files", "is_url", "isdir", "isfile", "open_binary", "open_text"]
