"""`python -m sft_jax`: the list of commands; `python -m sft_jax COMMAND ...` runs one."""

import sys

from sft_jax.cli import main

sys.exit(main())
