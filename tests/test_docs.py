"""The user documentation cannot rot silently: every error message quoted in
docs/troubleshooting.md still exists in the source, every command in the docs' code blocks names
modules, config files, config keys and flags that exist, and every relative link resolves.

Cheap static checks (no training, no jax compilation): module specs, config files loaded with
`load_config_file`, `--config.a.b` keys looked up in configs/base.py, flags searched in the
source of the module that parses them.
"""

import ast
import importlib.util
import pathlib
import re
import shlex

import pytest

from sft_jax.config import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
HOLE = "…"  # marks the varying parts of a quoted message
PLACEHOLDER_CONFIGS = {"configs/x.py"}  # README and older pages use it as a stand-in


# ----------------------------------------------------------------------------- error messages


def _string_templates() -> list[str]:
    """Every string literal of sft_jax/, f-strings with their holes as NUL; implicitly
    concatenated pieces are one literal, as the parser joins them."""
    out = []
    for path in (REPO / "sft_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr):
                out.append(
                    "".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values)
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
    return out


def quoted_messages() -> list[str]:
    text = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.startswith("**Message:**")]
    return [span for line in lines for span in re.findall(r"`([^`]+)`", line)]


def _found(message: str, templates: list[str]) -> bool:
    pieces = [p for p in message.split(HOLE) if p.strip()]
    pattern = ".*?".join(re.escape(p) for p in pieces)
    return any(re.search(pattern, t, re.DOTALL) for t in templates)


def test_troubleshooting_quotes_enough_messages():
    assert len(quoted_messages()) >= 30


def test_every_quoted_message_exists_in_the_source():
    templates = _string_templates()
    missing = [m for m in quoted_messages() if not _found(m, templates)]
    assert not missing, f"messages quoted in docs/troubleshooting.md but not in sft_jax/: {missing}"


def test_message_check_can_fail():
    templates = _string_templates()
    assert _found("workdir '…' is not writable", templates)
    assert not _found("workdir '…' is not writeable", templates)
    assert not _found("is not writable … workdir '", templates)  # order matters


# ----------------------------------------------------------------------------- commands


def code_block_commands(page: pathlib.Path) -> list[list[str]]:
    """Shell commands in fenced code blocks: continuation lines joined, quoted newlines kept,
    VAR=value assignments dropped. Output lines are not commands, and neither are `$ `
    transcripts on the troubleshooting page (they show deliberately broken commands)."""
    text = page.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            pending = f"{pending}\n{line}" if pending else line
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on on the next line
                continue
            pending = ""
            if words and words[0] == "$":
                if page.name == "troubleshooting.md":
                    continue
                words = words[1:]
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words and (words[:2] == ["python", "-m"] or _launcher(words)):
                commands.append(words)
    return commands


def _launcher(words: list[str]) -> str | None:
    for w in words[:3]:
        if w.startswith("launch/"):
            return w
    return None


def _all_commands() -> list[tuple[str, list[str]]]:
    return [(p.name, words) for p in PAGES for words in code_block_commands(p)]


def _module_sources(module: str) -> str:
    """The module's source plus that of every sft_jax module it imports (flags may be defined
    there: sft_jax.generate's are in sft_jax.chat, --config in sft_jax.config)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    if spec.submodule_search_locations:  # a package: run as package/__main__.py
        main = importlib.util.find_spec(f"{module}.__main__")
        assert main is not None, f"{module} is a package without __main__"
        spec = main
    text = pathlib.Path(spec.origin).read_text(encoding="utf-8")
    sources = [text]
    for name in set(re.findall(r"from (sft_jax(?:\.\w+)*) import", text)):
        found = importlib.util.find_spec(name)
        if found is not None and found.origin:
            sources.append(pathlib.Path(found.origin).read_text(encoding="utf-8"))
    return "\n".join(sources)


def _check_config_arg(value: str) -> None:
    if value in PLACEHOLDER_CONFIGS:
        return
    file, _, preset = value.partition(":")
    assert (REPO / file).is_file(), f"config file {file} does not exist"
    load_config_file(str(REPO / file) + (f":{preset}" if preset else ""))


def _check_config_key(dotted: str) -> None:
    node = load_config_file(str(REPO / "sft_jax" / "configs" / "base.py"))
    for part in dotted.split("."):
        assert part in node, f"--config.{dotted}: no key '{part}' in sft_jax/configs/base.py"
        node = node[part]


def _check_train_args(words: list[str], flag_source: str) -> None:
    """--config FILE, --config.a.b=v and other --flags (searched in `flag_source`)."""
    for i, w in enumerate(words):
        if not w.startswith("-") or w in ("-", "--"):
            continue
        name, eq, value = w.partition("=")
        if name == "--config":
            _check_config_arg(value if eq else words[i + 1])
        elif name.startswith("--config."):
            _check_config_key(name.removeprefix("--config."))
        else:
            bare = name.lstrip("-")
            options = (f'"{name}"', f'"{bare}"', f"{name})")
            assert any(o in flag_source for o in options), f"unknown flag {name}"


def _check_command(words: list[str]) -> None:
    launcher = _launcher(words)
    if words[:2] == ["python", "-m"]:
        module = words[2]
        source = _module_sources(module)
        rest = words[3:]
        if rest and not rest[0].startswith("-"):  # a subcommand (sft_jax.data inspect)
            assert f'"{rest[0]}"' in source, f"{module} has no subcommand {rest[0]}"
            rest = rest[1:]
        _check_train_args(rest, source)
        return
    script = REPO / launcher
    assert script.is_file(), f"{launcher} does not exist"
    own, train = words[words.index(launcher) + 1 :], None
    if "--" in own:
        own, train = own[: own.index("--")], own[own.index("--") + 1 :]
    elif launcher.endswith(".sbatch"):  # sbatch passes every argument to the trainer
        own, train = [], own
    script_text = script.read_text(encoding="utf-8")
    for w in own:
        if w.startswith("-"):
            assert f"{w})" in script_text, f"{launcher} has no option {w}"
    if train:
        _check_train_args(train, _module_sources("sft_jax.train"))


COMMANDS = _all_commands()


def test_docs_have_commands_to_check():
    pages = {page for page, _ in COMMANDS}
    assert {"quickstart.md", "bring_your_data.md", "tpu_pod.md"} <= pages


@pytest.mark.parametrize(
    "page,words", COMMANDS, ids=[f"{p}:{' '.join(w[:4])}" for p, w in COMMANDS]
)
def test_documented_command_names_real_modules_configs_and_flags(page, words):
    _check_command(words)


def test_command_check_can_fail():
    with pytest.raises(AssertionError, match="no key 'learnig_rate'"):
        _check_command(["python", "-m", "sft_jax.train", "--config.optim.learnig_rate=1"])
    with pytest.raises(AssertionError, match="unknown flag --devicez"):
        _check_command(["python", "-m", "sft_jax.plan", "--devicez", "4"])
    with pytest.raises(AssertionError, match="no option --zon"):
        _check_command(["launch/tpu_vm.sh", "--zon", "z", "--", "--config", "configs/demo.py"])
    with pytest.raises(AssertionError, match="does not exist"):
        _check_command(["python", "-m", "sft_jax.train", "--config", "configs/nope.py"])


# ----------------------------------------------------------------------------- links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def _links(page: pathlib.Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    for link in _links(page):
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link {link} points nowhere"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{page.name}: no heading for #{anchor}"


def test_slug_matches_github():
    assert _slug("Sizing a run: `python -m sft_jax.plan`") == "sizing-a-run-python--m-sft_jaxplan"
