"""Named chat templates and turn ends: the prefix-preserving Qwen3 / Qwen3.5 variants against the
stock templates on the real Qwen3 tokenizer, and where generation stops for a template."""

import numpy as np
import pytest

from sft_jax import hf
from sft_jax.data import Conversation, DataError, load_chat_template, load_tokenizer
from sft_jax.data.render import render_conversation, tokenize_rendered
from sft_jax.data.templates import (
    BUILTIN_TEMPLATES,
    NAMED_TEMPLATES,
    ChatTemplate,
    Stops,
    end_of_turn,
    generation_stops,
    template_variables,
)
from sft_jax.evaluation.evaluate import generation_eval
from sft_jax.model.decode import cut_at_stop_text, greedy_generate
from sft_jax.model.decoder import Transformer

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris"}}
CONVERSATIONS = {
    "plain": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6."},
    ],
    "thinking": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6."},
    ],
    "empty_think": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nHello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nGoodbye."},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": WEATHER}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "The tool said so."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ],
}
TOOLS = ({"type": "function", "function": {"name": "get_weather", "parameters": {}}},)
# (named variant, the stock template under chat-templates/trl it is checked against)
VARIANTS = [
    ("qwen3_thinking", "qwen3.jinja"),
    ("qwen3_nothink", "qwen3.jinja"),
    ("qwen3_5_thinking", "qwen3_5_think.jinja"),
    ("qwen3_5_nothink", "qwen3_5_nothink.jinja"),
    ("qwen3_6_thinking", "qwen3_6.jinja"),
    ("qwen3_6_nothink", "qwen3_6.jinja"),
]


@pytest.fixture(scope="module")
def qwen3(shared_assets):
    return load_tokenizer(str(shared_assets / "tok-qwen3"))


def conversation(name: str) -> Conversation:
    return Conversation(
        tuple(CONVERSATIONS[name]), f"{name}.jsonl:1", TOOLS if name == "tools" else None
    )


def stock_template(shared_assets, file: str, tokenizer, variant: str) -> ChatTemplate:
    """The stock template, with enable_thinking=False for a nothink variant, as a user of the
    stock template asks for non-thinking answers."""
    source = (shared_assets / "chat-templates" / "trl" / file).read_text()
    variables = template_variables(tokenizer)
    if variant.endswith("nothink"):
        variables += (("enable_thinking", False),)
    return ChatTemplate(file, source, variables)


def final_turn(text: str) -> str:
    return text[text.rindex("<|im_start|>assistant") :]


def trained_text(conv, template, tokenizer, train_on) -> str:
    rendered = render_conversation(conv, template, train_on)
    tokens, mask, _ = tokenize_rendered([rendered], [conv.source], tokenizer, train_on=train_on)[0]
    return tokenizer.decode(tokens[mask])


@pytest.mark.parametrize("variant,stock_file", VARIANTS)
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_variant_is_prefix_preserving_and_final_turn_equals_stock(
    shared_assets, qwen3, variant, stock_file, name
):
    conv = conversation(name)
    if variant.endswith("nothink") and name in ("thinking", "tools"):
        conv = Conversation(  # a non-thinking model is trained without reasoning
            tuple({k: v for k, v in m.items() if k != "reasoning_content"} for m in conv.messages),
            conv.source,
            conv.tools,
        )
        conv = Conversation(
            tuple(
                {**m, "content": m["content"].split("</think>")[-1].lstrip("\n")}
                for m in conv.messages
            ),
            conv.source,
            conv.tools,
        )
    ours = load_chat_template(variant, qwen3)
    stock = stock_template(shared_assets, stock_file, qwen3, variant)
    # Training on every assistant turn works with ours and is refused with the stock template.
    render_conversation(conv, ours, "all_assistant")
    with pytest.raises(DataError, match="not prefix-preserving"):
        render_conversation(conv, stock, "all_assistant")
    # The final assistant turn: the same text, the same generation prompt, the same trained tokens.
    msgs, last = conv.messages, len(conv.messages) - 1
    full = [
        t.render(msgs, conv.tools, add_generation_prompt=False, where="t") for t in (ours, stock)
    ]
    assert final_turn(full[0]) == final_turn(full[1])
    prompts = [
        t.render(msgs[:last], conv.tools, add_generation_prompt=True, where="t")
        for t in (ours, stock)
    ]
    assert final_turn(prompts[0]) == final_turn(prompts[1])
    assert trained_text(conv, ours, qwen3, "last_assistant") == trained_text(
        conv, stock, qwen3, "last_assistant"
    )


def test_thinking_variant_trains_every_turns_reasoning(qwen3):
    """Earlier turns keep their reasoning (the stock template drops it), and a turn without
    reasoning trains an empty think block, as the stock template renders a final turn."""
    conv = conversation("thinking")
    text = trained_text(conv, load_chat_template("qwen3_thinking", qwen3), qwen3, "all_assistant")
    assert "Two and two make four." in text and "Three and three." in text
    assert text.count("<think>") == 2 and text.count("<|im_end|>") == 2
    plain = conversation("plain")
    text = trained_text(plain, load_chat_template("qwen3_thinking", qwen3), qwen3, "all_assistant")
    assert text.count("<think>\n\n</think>\n\n") == 2
    nothink = trained_text(
        plain, load_chat_template("qwen3_nothink", qwen3), qwen3, "all_assistant"
    )
    assert "<think>" not in nothink and nothink.count("<|im_end|>") == 2  # in the prompt instead
    with pytest.raises(DataError, match="not prefix-preserving"):  # reasoning cannot follow it
        render_conversation(conv, load_chat_template("qwen3_nothink", qwen3), "last_assistant")


def test_named_templates_ship_with_the_package():
    from sft_jax.assets import asset_path

    for name, path in NAMED_TEMPLATES.items():  # under sft_jax/assets: package data
        with open(asset_path(path), encoding="utf-8") as f:
            assert f.readline().startswith("{#- " + name + ":")


def test_unknown_template_names_the_named_ones(qwen3):
    with pytest.raises(DataError, match="qwen3_thinking"):
        load_chat_template("qwen3_thinkin", qwen3)


def test_a_template_file_that_does_not_compile_is_refused_by_name(qwen3, tmp_path):
    """A Jinja syntax error (or a file that is not UTF-8) is the template's fault: a DataError
    naming the file and the line when the template is loaded, not a traceback from the first
    row's rendering."""
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(DataError, match=rf"{broken}' is not valid Jinja: line 2: unexpected"):
        load_chat_template(str(broken), qwen3)
    latin = tmp_path / "latin.jinja"
    latin.write_bytes(b"{{ messages[0].content }}\xe9")
    with pytest.raises(DataError, match=rf"{latin}' is not UTF-8"):
        load_chat_template(str(latin), qwen3)


# ----------------------------------------------------------------------------- ends of turns


def test_end_of_turn_is_the_first_special_token_after_the_answer(stories_dir, qwen3):
    assert end_of_turn(load_chat_template("chatml", qwen3), qwen3) == ("<|im_end|>", (151645,))
    assert end_of_turn(load_chat_template("qwen3_thinking", qwen3), qwen3) == (
        "<|im_end|>",
        (151645,),
    )
    stories = load_tokenizer(str(stories_dir))
    assert end_of_turn(load_chat_template("plain", stories), stories) == ("</s>", (2,))
    nothing = ChatTemplate("n", "{% for m in messages %}{{ m.content }}\n{% endfor %}", ())
    assert end_of_turn(nothing, stories) == ("", ())


def test_a_delimiter_split_into_tokens_is_refused_and_the_advice_works(stories_dir):
    """chatml's <|im_end|> is 7 tokens of the stories260K tokenizer: a model trained on it never
    stops at one token. Refused, naming templates that do work with this tokenizer."""
    stories = load_tokenizer(str(stories_dir))
    with pytest.raises(DataError, match=r"'<\|im_end\|>'.*7 tokens.*'alpaca' or 'plain'"):
        load_chat_template("chatml", stories)
    with pytest.raises(DataError, match=r"no chat template.*'alpaca' or 'plain'") as info:
        load_chat_template("tokenizer", stories)
    assert "chatml" not in str(info.value)
    for name in ("alpaca", "plain"):  # the suggestions load and end turns with EOS
        assert end_of_turn(load_chat_template(name, stories), stories)[1] == (2,)


def test_generation_stops_include_the_templates_end_of_turn(stories_dir, qwen3):
    base = load_tokenizer(str(stories_dir))
    stops = generation_stops(load_chat_template("chatml", qwen3), qwen3)
    assert stops.ids == (qwen3.eos_token_id,) and stops.texts == ("<|im_end|>",)
    # A split delimiter (only reachable without load_chat_template's check, e.g. a model's own
    # template in `generate --model`): a stop sequence as training tokenised it, and a stop text.
    chatml = ChatTemplate("chatml", BUILTIN_TEMPLATES["chatml"], ())
    split = generation_stops(chatml, base)
    assert split.ids == (2,) and split.texts == ("<|im_end|>",)
    (sequence,) = split.sequences
    assert base.decode(list(sequence)) == "<|im_end|>" and len(sequence) == 7
    assert generation_stops(None, base).ids == (2,)
    assert np.all(np.asarray(sequence) != 2)


# ----------------------------------------------------------------------------- stopping there


@pytest.fixture(scope="module")
def stories(stories_dir):
    config = hf.load_model_config(
        str(stories_dir), dtype="float32", param_dtype="float32", remat="none"
    )
    return Transformer(config), hf.load_params(str(stories_dir), config)


def test_generation_stops_at_a_multi_token_sequence(stories):
    model, params = stories
    (full,) = greedy_generate(model, params, [[1, 403]], max_new_tokens=12, stop_ids=[])
    sequence = full[4:7]
    k = next(i for i in range(len(full)) if full[i : i + 3] == sequence)
    kwargs = dict(max_new_tokens=12, stop_ids=[])
    (cut,) = greedy_generate(model, params, [[1, 403]], stop_sequences=[sequence], **kwargs)
    assert cut == full[:k]
    never = [full[0], -5, full[0]]  # -5 is no token: nothing stops
    (same,) = greedy_generate(model, params, [[1, 403]], stop_sequences=[never], **kwargs)
    assert same == full
    (one,) = greedy_generate(model, params, [[1, 403]], stop_sequences=[[full[3]]], **kwargs)
    assert one == full[: full.index(full[3])]


def test_held_out_answers_end_at_the_end_of_turn_text(stories_dir, stories):
    """The delimiter never shows in a scored answer, however the model spelled it (the bug:
    'quiet.<|im' scored against 'quiet.')."""
    model, params = stories
    tokenizer = load_tokenizer(str(stories_dir))
    prompt = [1, 403]
    (full,) = greedy_generate(model, params, [prompt], max_new_tokens=12, stop_ids=[])
    text = tokenizer.decode(full, skip_special_tokens=True)
    words = text.split()
    stop_text = " " + words[2]  # spelled by the model in its own tokens
    answer = text[: text.index(stop_text)]
    from sft_jax.data import EvalPrompt

    result = generation_eval(
        model,
        params,
        tokenizer,
        [EvalPrompt(prompt, answer, "x:1")],
        max_new_tokens=12,
        matches=("exact",),
        stops=Stops((2,), (), (stop_text,)),
    )
    assert result["generation_exact"] == 1.0 and result["samples"][0]["output"] == answer
    assert cut_at_stop_text("quiet.<|im_end|>\n<|im", ["<|im_end|>"]) == "quiet."
    assert cut_at_stop_text("quiet.", ["<|im_end|>", ""]) == "quiet."


def test_generate_command_stops_at_a_multi_token_end_of_turn(stories_dir, tmp_path, capsys):
    """`python -m sft_jax.generate --model DIR` (and `api.load(DIR).generate`) whose template ends
    turns with a word the model spells in several tokens: the reply ends before that word and
    never shows it."""
    import json
    import shutil

    from sft_jax import chat
    from sft_jax.generate import main

    model_dir = tmp_path / "model"
    shutil.copytree(stories_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())

    def reply_with(end: str) -> str:
        config["chat_template"] = (
            "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}" + end + "{% endif %}{% endfor %}"
        )
        config_path.write_text(json.dumps(config))
        args = ["--model", str(model_dir), "--prompt", "Once upon a time", "--max-new-tokens", "40"]
        assert main(args) == 0
        return capsys.readouterr().out.removesuffix("\n")

    free = reply_with("")
    for word in [w for w in free.split()[2:] if w.isalpha()]:  # one the model spells in pieces
        stops = chat.chat_stops(_tokenizer_with_end(model_dir, config, " " + word), str(model_dir))
        if stops.sequences:
            break
    assert stops.texts == (word,) and len(stops.sequences[0]) > 1, free
    expected = free[: free.index(word)].rstrip()
    assert reply_with(" " + word) == expected
    from sft_jax import api  # the Python API stops there too

    loaded = api.load(str(model_dir))
    user = [{"role": "user", "content": "Once upon a time"}]
    assert loaded.generate(user, max_new_tokens=40) == expected


def _tokenizer_with_end(model_dir, config, end):
    import json

    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}" + end + "{% endif %}{% endfor %}"
    )
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(str(model_dir))
