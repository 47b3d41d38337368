"""The data path: files -> rows -> tokens with loss masks -> packed rows -> batches.

Each stage is its own module so that new file formats, record formats and chat templates slot in:

    source.py    read_rows: JSONL files -> prompt/completion `Row`s (errors name file:line:field)
    tokenize.py  tokenize_rows: rows -> `TokenizedExample`s (tokens + loss_mask carried as data)
    pack.py      pack_examples: best-fit-decreasing packing with segment ids and positions
    loader.py    TrainIterator (grain, checkpointable) and eval_batches
    pipeline.py  prepare_data: config -> DataBundle (iterators + statistics) for the train loop
"""

from sft_jax.data.loader import TrainIterator, eval_batches
from sft_jax.data.pack import best_fit_decreasing, pack_examples, packing_stats
from sft_jax.data.pipeline import DataBundle, prepare_data, split_rows
from sft_jax.data.source import DataError, Row, expand_files, read_rows
from sft_jax.data.tokenize import (
    TokenizedExample,
    encode_prompt,
    load_tokenizer,
    tokenize_rows,
)

__all__ = [
    "DataBundle",
    "DataError",
    "Row",
    "TokenizedExample",
    "TrainIterator",
    "best_fit_decreasing",
    "encode_prompt",
    "eval_batches",
    "expand_files",
    "load_tokenizer",
    "pack_examples",
    "packing_stats",
    "prepare_data",
    "read_rows",
    "split_rows",
    "tokenize_rows",
]
