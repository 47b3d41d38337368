"""The data path: files -> examples -> tokens with loss masks -> packed rows -> batches.

Each stage is its own module so that new file formats, record formats and chat templates slot in:

    source.py     files (JSONL, JSON, Parquet, CSV, HF dataset dirs) -> raw records; exact errors
    raw_records.py  a file list's records, listed lazily (JSONL by offset, Parquet by row group)
    formats.py    records (text, prompt/completion, Alpaca, ShareGPT, messages+tools) -> examples
    templates.py  chat templates: the tokenizer's, built-ins (chatml, alpaca, plain) or a file
    render.py     conversations -> tokens + loss mask by turn-by-turn prefix rendering
    tokenize.py   prompt/completion rows -> tokens with an exact completion mask (fast path)
    encode.py     any examples -> TokenizedExamples on worker processes; eval prompts
    cache.py      the tokenisation cache: per-record encodings and prepared rows, keyed by contents
    cache_store.py  its files: verified (digest + marker) directories, parts of records
    cache_blocks.py  block digests of a part's large arrays, verified on first read (streaming)
    paths.py      the old name of sft_jax.paths (local paths, or gs:// through etils.epath)
    mixture.py    weighted mixtures of files
    pack.py       best-fit-decreasing packing with segment ids and per-segment positions
    shards.py     which records each data shard holds; agreeing on counts across processes
    loader.py     TrainIterator (sharded, grain, checkpointable, prefetching) and eval_batches
    pipeline.py   prepare_data: config -> DataBundle (iterators + statistics) for the train loop
    audit.py      duplicate / empty / contradictory / over-long / overlap report
    __main__.py   `python -m sft_jax.data inspect|audit --config ...`
"""

from sft_jax.data.encode import EncodeSettings, EvalPrompt, encode_examples, eval_prompt
from sft_jax.data.formats import (
    Conversation,
    FormatSpec,
    Row,
    Text,
    parse_record,
    read_examples,
    read_rows,
)
from sft_jax.data.loader import TrainIterator, eval_batches
from sft_jax.data.mixture import mix, parse_mixture
from sft_jax.data.pack import (
    best_fit_decreasing,
    pack_examples,
    packing_stats,
    split_into_gaps,
    whole_example_row_floor,
)
from sft_jax.data.pipeline import DataBundle, check_trainable, prepare_data, read_splits
from sft_jax.data.render import render_conversation
from sft_jax.data.shards import ShardPlan, shard_plan, split_rows
from sft_jax.data.source import DataError, expand_files, iter_records
from sft_jax.data.templates import BUILTIN_TEMPLATES, ChatTemplate, load_chat_template
from sft_jax.data.tokenize import (
    TokenizedExample,
    encode_prompt,
    load_tokenizer,
    tokenize_rows,
)

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatTemplate",
    "Conversation",
    "DataBundle",
    "DataError",
    "EncodeSettings",
    "EvalPrompt",
    "FormatSpec",
    "Row",
    "ShardPlan",
    "Text",
    "TokenizedExample",
    "TrainIterator",
    "best_fit_decreasing",
    "check_trainable",
    "encode_examples",
    "encode_prompt",
    "eval_batches",
    "eval_prompt",
    "expand_files",
    "iter_records",
    "load_chat_template",
    "load_tokenizer",
    "mix",
    "pack_examples",
    "packing_stats",
    "parse_mixture",
    "parse_record",
    "prepare_data",
    "read_examples",
    "read_rows",
    "read_splits",
    "render_conversation",
    "shard_plan",
    "split_into_gaps",
    "split_rows",
    "tokenize_rows",
    "whole_example_row_floor",
]
