"""Loss masks on real tokenizers and real chat templates equal the turn-by-turn expectation.

The expectation is computed independently of render.py's character offsets: for each assistant
turn i the *token* boundaries come from tokenising the prefix renderings P_i (up to the generation
prompt) and F_i (up to the end of the turn, trailing whitespace removed) on their own.
"""

import pathlib
import re

import numpy as np
import pytest
from conftest import SHARED_ASSETS

from sft_jax.data import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    Conversation,
    DataError,
    check_trainable,
    load_chat_template,
    load_tokenizer,
    render_conversation,
)
from sft_jax.data.render import fit_length, tokenize_rendered
from sft_jax.data.templates import template_variables

CONV = Conversation(
    (
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "It is 6."},
    ),
    "conv.jsonl:1",
)
TEMPLATE_DIRS = [SHARED_ASSETS / "chat-templates" / d for d in ("trl", "axolotl")]
TEMPLATES = sorted(p for d in TEMPLATE_DIRS if d.is_dir() for p in d.glob("*.jinja"))
_TOKENIZERS: dict[str, object] = {}


_MARKER = re.compile(
    r"<\|[^|<>\s']{1,40}\|>|<[a-z_]{2,30}>|</[a-z_]{2,30}>|\[/?[A-Z_]{3,20}\]"
    r"|<｜[^｜<>]{1,40}｜>|\[\|[a-z_]{2,30}\|\]|<\|[a-z_]{2,30}>|<[a-z_]{2,30}\|>"
)


def tokenizer_for(name: str):
    """Llama 3.1 for llama templates, else Qwen3; both also get every template's control markers
    (<|...|>, <start_of_turn>, [INST]) as special tokens, as the model family's own tokenizer
    would, so that the boundaries of turns tokenise the same in prefixes and in the whole."""
    key = "tok-llama3.1-hf" if "llama" in name else "tok-qwen3"
    if key not in _TOKENIZERS:
        tokenizer = load_tokenizer(str(SHARED_ASSETS / key))
        markers = sorted({m for p in TEMPLATES for m in _MARKER.findall(p.read_text())})
        tokenizer.add_special_tokens({"additional_special_tokens": markers})
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


class _Vars:  # template variables without loading a tokenizer at collection time
    bos_token, eos_token, pad_token, unk_token = "<s>", "</s>", "", ""


def classify(path: pathlib.Path) -> str:
    """'all' (prefix-preserving), 'last' (only the final turn is), or 'skip:<reason>'."""
    template = ChatTemplate(path.name, path.read_text(), template_variables(_Vars))
    try:
        render_conversation(CONV, template, "last_assistant")
    except DataError as e:
        reason = str(e).split("failed to render")[-1][:60] if "failed" in str(e) else "no-prefix"
        reason = "drops-content" if "leaves it out" in str(e) else reason
        return "skip:" + "".join(c if c.isalnum() else "-" for c in reason).strip("-")
    try:
        render_conversation(CONV, template, "all_assistant")
    except DataError:
        return "last"
    return "all"


CASES = [(p, classify(p)) for p in TEMPLATES]


def expected_mask(conv, template: ChatTemplate, tokenizer, turns) -> np.ndarray:
    """Token-level turn-by-turn expectation from separately tokenised prefixes."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = ids(template.render(conv.messages, None, add_generation_prompt=False, where="t"))
    mask = np.zeros(len(full), bool)
    for i in turns:
        before = ids(
            template.render(conv.messages[:i], None, add_generation_prompt=True, where="t")
        )
        upto_text = template.render(
            conv.messages[: i + 1], None, add_generation_prompt=False, where="t"
        )
        upto = ids(upto_text.rstrip())
        for prefix in (before, upto):
            # The prefix must tokenise as the start of the whole, except that its last token may
            # merge with the next characters (Qwen3.5's generation prompt ends in "<think>\n",
            # the whole has "<think>\n\n"): that straddling token is then not trained.
            n = len(prefix)
            assert full[:n] == prefix or full[: n - 1] == prefix[:-1], (template.name, i)
        mask[len(before) : len(upto)] = True
    return mask


def check(conv, template, tokenizer, train_on, turns):
    rendered = render_conversation(conv, template, train_on)
    tokens, mask, _ = tokenize_rendered([rendered], [conv.source], tokenizer, train_on=train_on)[0]
    want = expected_mask(conv, template, tokenizer, turns)
    n = len(want)
    assert np.array_equal(mask[:n], want), (template.name, tokenizer.decode(tokens[mask]))
    assert mask.sum() > 0 and not mask.all()
    eos = tokenizer.eos_token_id
    last_trained = tokens[mask][-1]
    assert eos in tokens[mask][-3:] or last_trained == eos  # the model learns to stop
    if len(tokens) > n:  # EOS appended only when the template did not emit it
        assert len(tokens) == n + 1 and tokens[-1] == eos and mask[-1]
    return tokens, mask


@pytest.mark.parametrize(
    "path,kind", CASES, ids=[f"{p.parent.name}/{p.stem}[{k}]" for p, k in CASES]
)
def test_real_template_masks_equal_turn_by_turn(path, kind):
    if kind.startswith("skip:"):
        pytest.skip(f"{path.name}: {kind}")
    tokenizer = tokenizer_for(path.name)
    template = ChatTemplate(path.name, path.read_text(), template_variables(tokenizer))
    check(CONV, template, tokenizer, "last_assistant", [3])
    if kind == "all":
        check(CONV, template, tokenizer, "all_assistant", [1, 3])
    else:  # not prefix-preserving: all_assistant must refuse, naming template and example
        with pytest.raises(DataError, match=rf"{path.name}.*not prefix-preserving") as info:
            render_conversation(CONV, template, "all_assistant")
        assert "conv.jsonl:1" in str(info.value)


def test_enough_real_templates_are_checked():
    kinds = [k for _, k in CASES]
    assert len(CASES) >= 80 and kinds.count("all") + kinds.count("last") >= 50, kinds


@pytest.mark.parametrize("name", ["tok-qwen3", "tok-llama3.1-hf"])
def test_stock_tokenizer_templates(shared_assets, name):
    tokenizer = load_tokenizer(str(shared_assets / name))
    template = load_chat_template("tokenizer", tokenizer)
    tokens, mask = check(CONV, template, tokenizer, "last_assistant", [3])
    text = tokenizer.decode(tokens[mask])
    assert "It is 6." in text and "2 + 2 = 4." not in text
    if name == "tok-llama3.1-hf":  # exactly one BOS, eot (= eos) trained, no appended extra
        assert tokens[0] == tokenizer.bos_token_id and tokens[1] != tokenizer.bos_token_id
        assert text.endswith("It is 6.<|eot_id|>")
        tokens, mask = check(CONV, template, tokenizer, "all_assistant", [1, 3])
        assert tokenizer.decode(tokens[mask]).count("<|eot_id|>") == 2
    else:  # Qwen3: <|im_end|> is EOS; all_assistant refused (earlier <think> blocks dropped)
        assert text.endswith("It is 6.<|im_end|>") and "\n" not in text[-3:]
        with pytest.raises(DataError, match="qwen3_thinking"):
            render_conversation(CONV, template, "all_assistant")
        training = load_chat_template(
            str(shared_assets / "chat-templates/trl/qwen3_training.jinja"), tokenizer
        )
        check(CONV, training, tokenizer, "all_assistant", [1, 3])


def test_a_trained_turns_reasoning_must_be_rendered(shared_assets):
    """Reasoning (reasoning_content, or a <think> block leading the content) of a trained turn
    that the template leaves out (chatml and Qwen2.5 have no reasoning) is refused naming the
    message, not trained as the answer alone. A template that renders it trains it; an earlier,
    untrained turn's reasoning may be dropped (the stock Qwen3 template does, by design)."""
    tokenizer = load_tokenizer(str(shared_assets / "tok-qwen3"))
    turns = [dict(m) for m in CONV.messages]
    turns[1]["reasoning_content"] = "Add two and two."
    turns[3]["reasoning_content"] = "Add three and three."
    conv = Conversation(tuple(turns), "r.jsonl:4")
    qwen25 = shared_assets / "chat-templates/trl/qwen2_5.jinja"
    for name in ("chatml", str(qwen25)):
        refused = r"r.jsonl:4: message 3 .*its reasoning.*qwen3_thinking"
        with pytest.raises(DataError, match=refused):
            render_conversation(conv, load_chat_template(name, tokenizer), "last_assistant")
    inline = [
        *CONV.messages[:3],
        {"role": "assistant", "content": "<think>Three plus three.</think>6."},
    ]
    drops_think = ChatTemplate(  # prints only what follows a think block
        "drops_think",
        "{% for m in messages %}{{ m.role }}: {{ m.content.split('</think>')[-1] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
        template_variables(tokenizer),
    )
    with pytest.raises(DataError, match=r"r.jsonl:5: message 3 .*its reasoning"):
        render_conversation(Conversation(tuple(inline), "r.jsonl:5"), drops_think, "all_assistant")
    rendered = render_conversation(
        conv, load_chat_template("qwen3_thinking", tokenizer), "all_assistant"
    )
    trained = "".join(rendered.text[a:b] for a, b in rendered.spans)
    assert "Add two and two." in trained and "Add three and three." in trained
    stock = render_conversation(conv, load_chat_template("tokenizer", tokenizer), "last_assistant")
    assert "Add two and two." not in stock.text and "Add three and three." in stock.text


def test_builtin_templates_on_a_tokenizer_without_template(stories_dir):
    tokenizer = load_tokenizer(str(stories_dir))
    for name in ("alpaca", "plain"):  # chatml is refused: <|im_end|> is 7 tokens here
        template = load_chat_template(name, tokenizer)
        tokens, mask = check(CONV, template, tokenizer, "all_assistant", [1, 3])
        assert tokens[0] == tokenizer.bos_token_id and tokens[1] != tokenizer.bos_token_id
        assert tokens[mask][-1] == tokenizer.eos_token_id
    with pytest.raises(DataError, match="no chat template"):
        load_chat_template("tokenizer", tokenizer)


def test_a_template_without_generation_prompt_is_named_with_its_trained_header(
    stories_dir, tmp_path, caplog
):
    """A template that ignores add_generation_prompt leaves the assistant header out of the
    prompt, so the header is trained with every answer. That is consistent with inference on
    such a template, but not the usual mask: one warning names the template and the header.
    Built-ins, which write a generation prompt, give none."""
    tokenizer = load_tokenizer(str(stories_dir))
    path = tmp_path / "nogen.jinja"
    path.write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
        "{{ eos_token if m['role'] == 'assistant' else '\n' }}{% endfor %}"
    )
    with caplog.at_level("WARNING", logger="sft_jax.data.templates"):
        for name in ("plain", "alpaca", str(path), str(path)):
            template = load_chat_template(name, tokenizer)
    warned = [r.getMessage() for r in caplog.records if "add_generation_prompt" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0] and "'assistant: '" in warned[0]
    rendered = render_conversation(CONV, template, "all_assistant")
    trained = "".join(rendered.text[a:b] for a, b in rendered.spans)
    assert trained.startswith("assistant: 2 + 2 = 4.")


def test_train_on_all_and_loss_weight_zero(shared_assets):
    tokenizer = tokenizer_for("qwen3")
    template = load_chat_template("chatml", tokenizer)
    r = render_conversation(CONV, template, "all")
    _, mask, _ = tokenize_rendered([r], ["x"], tokenizer, train_on="all")[0]
    assert mask.all()
    weighted = Conversation(CONV.messages, "w:1", None, (False, False, False, True))
    check(weighted, template, tokenizer, "all_assistant", [3])


def test_trainable_fraction_check():
    with pytest.raises(DataError, match="empty"):
        check_trainable(
            {"loss_tokens": 0, "trainable_fraction": 0.0}, "all_assistant", only_text=False
        )
    with pytest.raises(DataError, match="every token"):
        check_trainable(
            {"loss_tokens": 9, "trainable_fraction": 1.0}, "completion", only_text=False
        )
    check_trainable({"loss_tokens": 9, "trainable_fraction": 1.0}, "all", only_text=False)
    full = {"loss_tokens": 9, "trainable_fraction": 1.0}  # one-token prompts: masked, no target
    check_trainable(full, "completion", only_text=False, masks_a_token=True)
    check_trainable({"loss_tokens": 9, "trainable_fraction": 1.0}, "all_assistant", only_text=True)


def test_untrained_last_turn_does_not_train_the_appended_eos(stories_dir):
    """chatml does not write EOS; with loss_weight 0 on the last turn nothing is appended (an EOS
    there would be context that teaches nothing, or a target after a turn not to be learnt)."""
    tokenizer = load_tokenizer(str(stories_dir))
    # Built directly: load_chat_template refuses chatml on this tokenizer (<|im_end|> is not one
    # of its tokens), which does not matter to the mask logic tested here.
    template = ChatTemplate("chatml", BUILTIN_TEMPLATES["chatml"], template_variables(tokenizer))
    eos = tokenizer.eos_token_id
    weighted = Conversation(CONV.messages, "w:1", None, (True, True, True, False))
    for train_on in ("all_assistant", "last_assistant"):
        r = render_conversation(weighted, template, train_on)
        tokens, mask, _ = tokenize_rendered([r], ["w:1"], tokenizer, train_on=train_on)[0]
        assert eos not in tokens and not mask[-1], train_on
        assert tokenizer.decode(tokens[mask]) == "2 + 2 = 4.<|im_end|>", train_on
    r = render_conversation(CONV, template, "all_assistant")
    tokens, mask, _ = tokenize_rendered([r], ["c:1"], tokenizer, train_on="all_assistant")[0]
    assert tokens[-1] == eos and mask[-1]  # a trained last turn still learns to stop


# A template whose turns end in a newline only: render.py appends EOS (stories260K has no
# single-token chatml end of turn, so load_chat_template refuses "chatml" for it).
NO_EOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant", "all"])
@pytest.mark.parametrize("name", ["stories260K/hf", "gemma"])
def test_no_eos_after_a_final_user_turn(shared_assets, train_on, name):
    """A conversation ending with a user (or tool) turn gets no EOS: the model must not learn to
    end the document once a user has spoken (Gemma's end of turn is not EOS, so EOS used to be
    appended after the user turn and trained, as with any template that writes no EOS)."""
    if name == "gemma":
        tokenizer = tokenizer_for("gemma")  # Qwen3 + <start_of_turn>/<end_of_turn> as tokens
        source = (shared_assets / "chat-templates/trl/gemma.jinja").read_text()
    else:
        tokenizer, source = load_tokenizer(str(shared_assets / name)), NO_EOS_TEMPLATE
    tpl = ChatTemplate(name, source, template_variables(tokenizer))
    conv = Conversation((*CONV.messages, {"role": "user", "content": "Thanks!"}), "u:1")
    r = render_conversation(conv, tpl, train_on)
    tokens, mask, _ = tokenize_rendered([r], ["u:1"], tokenizer, train_on=train_on)[0]
    assert tokenizer.eos_token_id not in tokens.tolist(), tokenizer.decode(tokens)
    assert len(tokens) == len(tokenizer(r.text, add_special_tokens=False)["input_ids"])
    if train_on != "all":
        assert "It is 6." in tokenizer.decode(tokens[mask])
        assert "Thanks!" not in tokenizer.decode(tokens[mask])
    r = render_conversation(CONV, tpl, train_on)  # ending with the answer: EOS appended, trained
    tokens, mask, _ = tokenize_rendered([r], ["c:1"], tokenizer, train_on=train_on)[0]
    assert tokens[-1] == tokenizer.eos_token_id and mask[-1]


def test_split_counts_pieces_it_had_to_cut():
    tokens = np.arange(30, dtype=np.int32)
    mask = np.ones(30, bool)
    ends = np.array([5, 25, 30])
    pieces, counts = fit_length(tokens, mask, ends, "s:1", seq_len=9, overlong="split")
    assert [len(p.tokens) for p in pieces] == [5, 10, 5]
    assert (counts.split, counts.truncated, counts.dropped) == (1, 1, 0)
    pieces, counts = fit_length(tokens, mask, [10, 20, 30], "s:1", seq_len=9, overlong="split")
    assert [len(p.tokens) for p in pieces] == [10, 10, 10]
    assert (counts.split, counts.truncated, counts.dropped) == (1, 0, 0)


@pytest.mark.parametrize(
    "name,template,expected",
    [
        ("tok-llama3.1-hf", "llama3_1.jinja", '"parameters": {"city": "Paris"}}<|eot_id|>'),
        ("tok-qwen3", "qwen3_training.jinja", '"arguments": {"city": "Paris"}}\n</tool_call>'),
    ],
)
def test_string_tool_arguments_trained_as_json_objects(
    tmp_path, shared_assets, name, template, expected
):
    import json

    from sft_jax.data import FormatSpec, read_examples

    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": call}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    (tmp_path / "t.jsonl").write_text(json.dumps(record) + "\n")
    (conv,), _ = read_examples(str(tmp_path / "t.jsonl"), FormatSpec(), on_bad_row="error")
    tokenizer = load_tokenizer(str(shared_assets / name))
    tpl = load_chat_template(str(shared_assets / "chat-templates/trl" / template), tokenizer)
    r = render_conversation(conv, tpl, "all_assistant")
    tokens, mask, _ = tokenize_rendered([r], [conv.source], tokenizer, train_on="all_assistant")[0]
    trained = tokenizer.decode(tokens[mask])
    assert expected in trained and "\\" not in trained, trained
