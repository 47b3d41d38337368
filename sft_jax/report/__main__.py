"""`python -m sft_jax.report`: the run report."""

import sys

from sft_jax.report import main

sys.exit(main())
