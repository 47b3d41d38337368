"""File formats, record formats, bad input with file:line:field errors, mixtures, eval prompts."""

import hashlib
import json
import pathlib
import re

import numpy as np
import pytest

from sft_jax.data import (
    Conversation,
    DataError,
    FormatSpec,
    Row,
    Text,
    mix,
    parse_mixture,
    read_examples,
)
from sft_jax.data.mixture import mixture_counts

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
RECORDS = [
    {"text": "plain words"},
    {"prompt": "p", "completion": "c"},
    {"instruction": "do", "input": "this", "output": "done"},
    {"id": 7, "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    CHAT,
]


def read(path, fmt="auto", field_map="") -> list:
    return read_examples(str(path), FormatSpec.parse(fmt, field_map, ""), on_bad_row="error")[0]


def test_every_record_format_detected(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    text, row, alpaca, share, msgs = read(path)
    assert text == Text("plain words", f"{path}:1")
    assert row == Row("p", "c", f"{path}:2")
    assert alpaca.messages[0] == {"role": "user", "content": "do\n\nthis"}
    assert alpaca.messages[1] == {"role": "assistant", "content": "done"}
    assert [m["role"] for m in share.messages] == ["user", "assistant"]
    assert isinstance(msgs, Conversation) and msgs.source == f"{path}:5"


def test_file_formats_agree(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "a.csv").write_text(
        "prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(5))
    )
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    expected = [(r["prompt"], r["completion"]) for r in rows]
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet", "hf"):
        got = read(tmp_path / name)
        assert [(e.prompt, e.completion) for e in got] == expected, name
    assert read(tmp_path / "a.json")[1].source == f"{tmp_path / 'a.json'}:6"  # the line of its "{"
    assert read(tmp_path / "a.parquet")[1].source.endswith("a.parquet:row 2")


def test_field_map_and_real_files(shared_assets, tmp_path):
    gsm = read(
        shared_assets / "data-gsm8k/test.jsonl", field_map="prompt=question,completion=answer"
    )
    assert len(gsm) == 1319 and isinstance(gsm[0], Row)
    share = read(shared_assets / "data-fastchat/dummy_conversation.json")
    assert len(share) == 500 and all(isinstance(c, Conversation) for c in share)
    tools = read(shared_assets / "data-llamafactory/glaive_toolcall_en_demo.json")
    assert any(m.get("tool_calls") for c in tools for m in c.messages) and tools[0].tools
    msgs = read(shared_assets / "data-llamafactory/v1_sft_demo.jsonl")
    assert msgs[0].train == (False, True)  # loss_weight 0 on the user turn


def test_field_map_never_overwrites_a_field(tmp_path):
    """A record holding both the mapped field and its target (`question` and `prompt` with
    prompt=question) is an error naming both: keeping either would drop the other's text. The
    mapping reads the record as given, so swapping two fields works."""
    path = tmp_path / "a.jsonl"
    path.write_text(
        json.dumps({"question": "q", "answer": "a"})
        + "\n"
        + json.dumps({"question": "q", "prompt": "kept?", "answer": "a"})
        + "\n"
    )
    with pytest.raises(DataError, match=rf"{path}:2: field 'prompt': .*both 'question'"):
        read(path, field_map="prompt=question,completion=answer")
    spec = FormatSpec.parse("auto", "prompt=question,completion=answer", "")
    assert read_examples(str(path), spec, on_bad_row="skip")[1] == 1
    path.write_text(json.dumps({"prompt": "c", "completion": "p"}) + "\n")
    assert read(path, field_map="prompt=completion,completion=prompt") == [
        Row("p", "c", f"{path}:1")
    ]


BAD = {
    # name: (record, substrings the error must contain besides path:line)
    "unknown_role": (
        {"messages": [{"role": "robot", "content": "x"}]},
        ["messages[0].role", "robot"],
    ),
    "sharegpt_role": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
        ["conversations[1].from", "'bot'"],
    ),
    "empty_assistant": (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        ["message 1", "empty assistant"],
    ),
    "non_string_content": (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
        ["messages[0].content", "int"],
    ),
    "no_assistant": ({"messages": [{"role": "user", "content": "q"}]}, ["no assistant"]),
    "user_null_content": (
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
        ["messages[0].content", "user message without content"],
    ),
    "system_missing_content": (
        {
            "messages": [
                {"role": "system"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
        ["messages[0].content", "system message without content"],
    ),
    "unknown_message_key": (
        {"messages": [{"role": "user", "content": "q", "contnt": "x"}]},
        ["messages[0].contnt", "unknown"],
    ),
    "unknown_field": ({**CHAT, "extra": 1}, ["'extra'", "unknown field"]),
    "alpaca_missing_output": ({"instruction": "x", "output": None}, ["'output'", "NoneType"]),
    "undetectable": ({"question": "q"}, ["cannot tell the format", "field_map"]),
    "bad_tools": ({**CHAT, "tools": "not json"}, ["'tools'", "not JSON"]),
    "typo_field_auto": (
        {"prompt": "a", "completon": "b"},
        ["cannot tell the format", "did you mean 'completion'"],
    ),
    "messages_loss_weight": (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "loss_weight": 0.5},
            ]
        },
        ["messages[1].loss_weight", "0.5"],
    ),
    "sharegpt_weight": (
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b", "weight": 0.5},
            ]
        },
        ["conversations[1].weight", "0.5"],
    ),
    "reasoning_not_string": (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "reasoning_content": 4},
            ]
        },
        ["messages[1].reasoning_content", "must be a string"],
    ),
    "tool_arguments_not_json": (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "f", "arguments": "{x"}}
                    ],
                },
            ]
        },
        ["messages[1].tool_calls[0].function.arguments", "not JSON"],
    ),
    "tool_arguments_not_object": (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}
                    ],
                },
            ]
        },
        ["messages[1].tool_calls[0].function.arguments", "JSON object"],
    ),
    "function_call_arguments_not_json": (
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "function_call", "value": json.dumps({"name": "f", "arguments": "{x"})},
            ]
        },
        ["conversations[1].value.arguments", "not JSON"],
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_records_named_and_skippable(tmp_path, name):
    record, expected = BAD[name]
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{json.dumps(CHAT)}\n{json.dumps(record)}\n{json.dumps(CHAT)}\n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DataError) as info:
        read(path)
    assert f"{path}:2" in str(info.value)
    for part in expected:
        assert part in str(info.value), str(info.value)
    examples, skipped = read_examples(str(path), FormatSpec(), on_bad_row="skip")
    assert (len(examples), skipped) == (2, 1)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # never modified


TOOLS = [  # two schemas with different properties: Arrow fills each with the other's as null
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    },
]
TOOL_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4", "loss_weight": 0},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ],
        "tools": TOOLS,
    },
    {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "sunny", "name": "get_weather"},
            {"role": "assistant", "content": "It is sunny."},
        ],
        "tools": TOOLS,
    },
]


def test_arrow_messages_and_tools_equal_jsonl(tmp_path, shared_assets):
    """Parquet and saved-dataset rows read as the JSONL rows do: no keys Arrow filled with None."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sft_jax.data import ChatTemplate, render_conversation
    from sft_jax.data.templates import template_variables

    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOOL_ROWS))
    pq.write_table(pa.Table.from_pylist(TOOL_ROWS), tmp_path / "m.parquet")
    datasets.Dataset.from_list(TOOL_ROWS).save_to_disk(str(tmp_path / "hf"))
    jsonl = read(tmp_path / "m.jsonl")
    assert jsonl[0].messages[0] == {"role": "user", "content": "What is 2+2?"}
    assert jsonl[0].train == (True, False, True, True)
    assert jsonl[1].messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert jsonl[0].tools == tuple(TOOLS)
    path = shared_assets / "chat-templates/trl/llama3_1.jinja"

    class Vars:
        bos_token, eos_token, pad_token, unk_token = "<|begin_of_text|>", "<|eot_id|>", "", ""

    template = ChatTemplate(path.name, path.read_text(), template_variables(Vars))
    want = [render_conversation(c, template, "all_assistant") for c in jsonl]
    for name in ("m.parquet", "hf"):
        got = read(tmp_path / name)
        for a, b in zip(got, jsonl, strict=True):
            assert (a.messages, a.tools, a.train) == (b.messages, b.tools, b.train), name
        assert [render_conversation(c, template, "all_assistant") for c in got] == want, name


def test_json_null_in_jsonl_tool_schema_is_kept(tmp_path):
    """Only Arrow's nulls are fill-ins; a null written in JSON is the user's and stays."""
    schema = {"name": "f", "parameters": {"type": "object", "properties": {}, "default": None}}
    record = {
        **CHAT,
        "tools": [schema],
        "messages": [
            *CHAT["messages"][:1],
            {"role": "assistant", "content": "x", "tool_calls": None, "name": None},
        ],
    }
    (tmp_path / "n.jsonl").write_text(json.dumps(record) + "\n")
    (conv,) = read(tmp_path / "n.jsonl")
    assert conv.tools == ({"type": "function", "function": schema},)
    assert conv.messages[1] == {"role": "assistant", "content": "x"}


def test_sharegpt_weight_is_a_train_flag(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    record = {
        "system": "be brief",
        "conversations": [
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "bad", "weight": 0},
            {"from": "human", "value": "b"},
            {"from": "gpt", "value": "good", "weight": 1},
            {"from": "human", "value": "c"},
            {"from": "gpt", "value": "fine"},
        ],
    }
    (tmp_path / "w.jsonl").write_text(json.dumps(record) + "\n")
    pq.write_table(pa.Table.from_pylist([record]), tmp_path / "w.parquet")
    for name in ("w.jsonl", "w.parquet"):  # Parquet fills the missing weight with None
        (conv,) = read(tmp_path / name)
        assert [m["role"] for m in conv.messages][:2] == ["system", "user"]
        assert conv.train == (True, True, False, True, True, True, True), name


def test_string_tool_arguments_become_objects(tmp_path):
    """OpenAI's wire format carries arguments as a JSON string; templates expect an object."""
    call = {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": None})}
    share = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ]
    }
    (tmp_path / "t.jsonl").write_text(json.dumps(TOOL_ROWS[1]) + "\n" + json.dumps(share) + "\n")
    msgs, sharegpt = read(tmp_path / "t.jsonl")
    assert msgs.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    got = sharegpt.messages[1]["tool_calls"][0]["function"]
    assert got == {"name": "get_weather", "arguments": {"city": "Paris", "unit": None}}


def test_bad_bytes_and_malformed_json_list_and_csv(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=rf"{bad_json}:3: malformed JSON"):
        read(bad_json)
    utf = tmp_path / "utf.json"
    utf.write_bytes(b'[\n {"text": "a"},\n {"text": "caf\xc3"}\n]')
    with pytest.raises(DataError, match=rf"{utf}:3: invalid UTF-8"):
        read(utf)
    csv = tmp_path / "bad.csv"
    csv.write_bytes(b"prompt,completion\np,c\np,caf\xc3\n")
    with pytest.raises(DataError, match=rf"{csv}:3: field 'completion'.*UTF-8"):
        read(csv)
    assert read_examples(str(csv), FormatSpec(), on_bad_row="skip")[1] == 1
    short = tmp_path / "short.csv"  # a row without its last column; a quote never closed
    short.write_text('prompt,completion\np,c\nonly\n"open,c\np,c\n')
    with pytest.raises(DataError, match=rf"{short}:3: field 'completion': missing: 1 of 2"):
        read(short)
    examples, skipped = read_examples(str(short), FormatSpec(), on_bad_row="skip")
    assert (len(examples), skipped) == (1, 2)
    short.write_text('prompt,completion\np,c\n"open,c\np,c\n')
    with pytest.raises(DataError, match=rf"{short}:3: field 'completion'.*quote left open"):
        read(short)


def test_json_the_decoder_cannot_hold_is_a_row_error(tmp_path):
    """Nesting past Python's recursion limit and integers of more than 4300 digits make `json`
    raise RecursionError / ValueError instead of JSONDecodeError: still a bad row naming file and
    line (skippable in JSONL), never a traceback. Nesting the decoder accepts is not refused."""
    deep = '{"text": "a", "meta": ' + "[" * 5000 + "]" * 5000 + "}"
    huge = '{"text": 1' + "0" * 5000 + "}"
    shallow = '{"text": "b", "meta": ' + "[" * 900 + "]" * 900 + "}"
    good = json.dumps({"text": "c"})
    for bad, why in ((deep, "nested too deeply"), (huge, "4300 digits")):
        path = tmp_path / "bad.jsonl"
        path.write_text(f"{good}\n{bad}\n{good}\n")
        with pytest.raises(DataError, match=rf"{path}:2: malformed JSON: .*{why}"):
            read(path)
        assert read_examples(str(path), FormatSpec(), on_bad_row="skip")[1] == 1
        listed = tmp_path / "bad.json"
        listed.write_text(f"[{good},\n{bad}]")
        with pytest.raises(DataError, match=rf"{listed}:2: malformed JSON: .*{why}"):
            read(listed)
    path = tmp_path / "shallow.jsonl"
    path.write_text(shallow + "\n")
    examples, _ = read_examples(str(path), FormatSpec.parse("auto", "", "meta"), on_bad_row="error")
    assert examples == [Text("b", f"{path}:1")]


def test_a_pretty_printed_object_in_a_json_file_is_named_as_such(tmp_path):
    """A .json file holding one object over several lines (a {"data": [...]} wrapper) is neither
    a list nor JSON Lines: the error says so instead of calling its first line malformed JSON.
    A .json file of JSON Lines still reads."""
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"prompt": "p", "completion": "c"}]}, indent=2))
    with pytest.raises(DataError, match=rf"{wrapped}:1: .*list of objects.*one object over"):
        read(wrapped)
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert read(lines) == [Row("p", "c", f"{lines}:1")]


def test_mixture_weights_respected():
    assert parse_mixture("a.jsonl:0.9, b/*.json:0.1") == [("a.jsonl", 0.9), ("b/*.json", 0.1)]
    assert parse_mixture("a.jsonl,b.jsonl") == [("a.jsonl", None), ("b.jsonl", None)]
    with pytest.raises(DataError, match="every entry"):
        parse_mixture("a.jsonl:0.9,b.jsonl")
    with pytest.raises(DataError, match="positive"):
        parse_mixture("a.jsonl:-1")
    big, small = [("a", i) for i in range(900)], [("b", i) for i in range(100)]
    mixed = mix([big, small], [0.5, 0.5], seed=0)
    assert len(mixed) == 1000 and sum(g == "b" for g, _ in mixed) == 500
    assert len({x for x in mixed if x[0] == "a"}) == 500  # subsampled without replacement
    counts = np.bincount([i for g, i in mixed if g == "b"])
    assert counts.min() == counts.max() == 5  # oversampled evenly
    assert mix([big, small], [0.5, 0.5], seed=0) == mixed
    assert mixture_counts([10, 10, 10], [0.2, 0.3, 0.5]) == [6, 9, 15]


def test_prepare_data_chat_mixture_and_eval_prompts(tmp_path, shared_assets, stories_dir):
    from configs import base
    from sft_jax.config import parse
    from sft_jax.data import prepare_data

    share = shared_assets / "data-fastchat/dummy_conversation.json"
    alpaca = shared_assets / "data-llamafactory/alpaca_en_demo.json"
    c = base.get_config()
    c.data.tokenizer = str(stories_dir)
    c.data.train_files = f"{share}:0.75,{alpaca}:0.25"
    c.data.chat_template = "plain"
    c.data.eval_fraction = 0.05
    c.data.seq_len = 512
    c.data.overlong = "split"
    bundle = prepare_data(parse(c))
    stats = bundle.stats
    n = sum(stats["mixture"])
    assert abs(stats["mixture"][0] / n - 0.75) < 0.01 and 0 < stats["trainable_fraction"] < 1
    assert stats["split"] > 0 and stats["examples"] >= n
    prompts = bundle.eval_prompts
    assert prompts and all(p.prompt_ids and p.reference for p in prompts)
    tok = bundle.tokenizer
    assert tok.decode(prompts[0].prompt_ids).endswith("Assistant:")


@pytest.mark.parametrize("streaming", [False, True])
def test_eval_files_that_yield_nothing_fail(tmp_path, stories_dir, streaming):
    """Named eval files that hold no usable example (empty, or every row skipped) stop the run
    like empty train files do, instead of silently training without validation."""
    from configs import base
    from sft_jax.config import parse
    from sft_jax.data import prepare_data

    train, empty, bad = tmp_path / "t.jsonl", tmp_path / "e.jsonl", tmp_path / "b.jsonl"
    train.write_text('{"prompt": "a b c", "completion": "d"}\n' * 4)
    empty.write_text("\n")
    bad.write_text("{x\n")
    c = base.get_config()
    c.data.tokenizer = str(stories_dir)
    c.data.train_files = str(train)
    c.data.streaming = streaming
    c.data.on_bad_row = "skip"
    c.train.global_batch_size = 2
    for files, skipped in ((empty, 0), (bad, 1)):
        c.data.eval_files = str(files)
        with pytest.raises(DataError, match=rf"no eval examples in {files} \({skipped} skipped"):
            prepare_data(parse(c), cache_dir=str(tmp_path / "cache"))
    c.data.max_eval_examples = 0  # asked for no eval examples: not an error
    assert prepare_data(parse(c), cache_dir=str(tmp_path / "cache")).stats["eval_examples"] == 0


def test_all_ones_mask_fails_before_training(tmp_path, stories_dir):
    from configs import base
    from sft_jax.config import parse
    from sft_jax.data import prepare_data

    path = pathlib.Path(tmp_path / "t.jsonl")
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    c = base.get_config()
    c.data.tokenizer = str(stories_dir)
    c.data.train_files = str(path)
    c.data.train_on = "all"
    assert prepare_data(parse(c)).stats["trainable_fraction"] == 1.0
    path.write_text(
        '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}\n'
    )
    c.data.chat_template = str(tmp_path / "t.jinja")  # a broken template: no user turn rendered
    pathlib.Path(c.data.chat_template).write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    c.data.train_on = "all_assistant"
    with pytest.raises(DataError, match="every token"):
        prepare_data(parse(c))
    c.data.streaming = True
    with pytest.raises(DataError, match="every token"):
        prepare_data(parse(c), cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("streaming", [False, True])
def test_one_token_prompts_pass_the_mask_check(tmp_path, stories_dir, streaming):
    """An empty prompt is the start token alone: never a target, so every target is trained
    (fraction 1.0) although the prompt is masked; that is not the broken mask the check refuses,
    and only the completions (and EOS) are trained."""
    from configs import base
    from sft_jax.config import parse
    from sft_jax.data import prepare_data

    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "", "completion": "b c"}\n' * 4)
    c = base.get_config()
    c.data.tokenizer = str(stories_dir)
    c.data.train_files = str(path)
    c.data.train_on = "completion"
    c.data.streaming = streaming
    c.train.global_batch_size = 2
    for _ in range(2):  # encoded, then from the cache (prepared rows, or the streamed counts)
        bundle = prepare_data(parse(c), cache_dir=str(tmp_path / "cache"))
        assert bundle.stats["trainable_fraction"] == 1.0
    tok = bundle.tokenizer
    completion = tok("b c", add_special_tokens=False)["input_ids"]
    batch = next(iter(bundle.train_iter))
    answer = [*completion, tok.eos_token_id]
    for targets, mask in zip(batch["targets"], batch["loss_mask"], strict=True):
        trained = [int(t) for t in np.asarray(targets)[np.asarray(mask, bool)]]
        assert trained and trained == answer * (len(trained) // len(answer))


def test_truncated_examples_are_named_in_a_warning(tmp_path, stories_dir, caplog):
    """The default data.overlong cuts an example at seq_len: never silently. The warning names
    the first cut examples (file:line, and a conversation's length) and says how to keep them
    whole."""
    from configs import base
    from sft_jax.config import parse
    from sft_jax.data import prepare_data

    long_text = " ".join(["once upon a time there was a little dog"] * 40)
    rows = [
        {"prompt": "Tell me a story.", "completion": "The end."},
        {"prompt": "Tell me a long story.", "completion": long_text},
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": long_text},
            ]
        },
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = base.get_config()
    c.data.tokenizer = str(stories_dir)
    c.data.train_files = str(path)
    c.data.chat_template = "plain"
    c.data.seq_len = 64
    with caplog.at_level("WARNING"):
        stats = prepare_data(parse(c)).stats
    assert stats["truncated"] == 2
    warned = [r.getMessage() for r in caplog.records if "cut at seq_len=64" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert f"{path}:2 (over-long)" in warned[0] and "data.seq_len" in warned[0]
    assert re.search(re.escape(f"{path}:3 (") + r"\d+ tokens\)", warned[0])


@pytest.mark.parametrize(
    "name,head",
    [
        ("train.jsonl.gz", None),  # real gzip bytes
        ("train.json.gz", None),
        ("plain.jsonl", b"\x28\xb5\x2f\xfd\x00"),  # zstd bytes under a plain name
        ("plain.jsonl", b"BZh91AY&SY"),
        ("plain.json", b"\xfd7zXZ\x00\x00"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_compressed_data_files_are_named_as_such(tmp_path, stories_dir, name, head, streaming):
    """A compressed data file is refused naming the file and the compression, in memory and
    streamed, instead of failing as "invalid UTF-8" at line 1."""
    import gzip

    from configs import base
    from sft_jax.config import parse
    from sft_jax.data import prepare_data

    path = tmp_path / name
    line = b'{"prompt": "a b c", "completion": "d"}\n' * 4
    path.write_bytes(gzip.compress(line) if head is None else head + line)
    with pytest.raises(DataError, match=rf"{path}: a \w+-compressed file.*Decompress it first"):
        read(path)
    c = base.get_config()
    c.data.tokenizer = str(stories_dir)
    c.data.train_files = str(tmp_path / "*.json*")
    c.data.streaming = streaming
    c.data.on_bad_row = "skip"  # not a bad row: the whole file is refused
    c.train.global_batch_size = 2
    with pytest.raises(DataError, match=rf"{path}: a \w+-compressed file.*`gunzip`"):
        prepare_data(parse(c), cache_dir=str(tmp_path / "cache"))


def test_tool_call_turn_may_have_null_content(tmp_path):
    """OpenAI-format tool-call turns carry `"content": null`: accepted as an empty text, as are
    tool results as before; only user and system turns must have content."""
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    record = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "r", "name": "f"},
            {"role": "assistant", "content": "a"},
        ]
    }
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (example,) = read(path)
    assert example.messages[1]["content"] == "" and example.messages[1]["tool_calls"]
