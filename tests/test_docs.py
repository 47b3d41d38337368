"""The user documentation cannot rot silently: every error message quoted in
docs/troubleshooting.md still exists in the source, every command in the docs' code blocks names
modules, config files, config keys and flags that exist, and every relative link resolves.

Cheap static checks (no training, no jax compilation): module specs, config files loaded with
`load_config_file`, `--config.a.b` keys looked up in sft_jax/configs/base.py, flags searched in the
source of the module that parses them.
"""

import ast
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from sft_jax.config_file import load_config_file
from sft_jax.configs import base

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
HOLE = "…"  # marks the varying parts of a quoted message
PLACEHOLDER_CONFIGS = {"configs/x.py"}  # README and older pages use it as a stand-in
PLACEHOLDER_CONFIGS.add("my_run.py")  # quickstart's own config file; test_cli.py runs it


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
    there: --config's are in sft_jax.config)."""
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
    node = base.get_config()
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


# ------------------------------------------------------------------------ unreachable references

# Paths of one machine, and references to the project's internal notes and issue tracker: a user of
# the repository can open none of them. Each pattern is (name, regex).
FORBIDDEN = (
    ("a machine path", r"/work/|/root/"),
    ("a virtualenv's interpreter", r"(?<![\w$/}])\.venv/bin/python|/\w[\w./-]*venv/bin/python"),
    ("the internal guide", r"\bGUIDE\b"),
    ("an issue number", r"(?i)\bissues? #\d+"),
    ("the issue", r"(?i)\bthe issue's\b"),
)
SCANNED = (
    "README.md",
    ".ci",
    "docs",
    "sft_jax",
    "configs",
    "benchmarks",
    "launch",
    "tests",
    "pyproject.toml",
)


def _scanned_files() -> list[pathlib.Path]:
    files = []
    for name in SCANNED:
        path = REPO / name
        found = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [
            f
            for f in found
            if f.is_file()
            and f.suffix in (".md", ".py", ".sh", ".sbatch", ".toml", ".yaml", ".jinja", "")
            and f.name != "test_docs.py"  # it names the patterns
            and "golden" not in f.parts
        ]
    return files


def forbidden_references(text: str) -> list[str]:
    return [
        f"{name}: {m.group(0)!r}" for name, pattern in FORBIDDEN for m in re.finditer(pattern, text)
    ]


def test_no_machine_paths_guide_or_issue_references():
    files = _scanned_files()
    names = {str(f.relative_to(REPO)) for f in files}
    assert {"README.md", "docs/benchmarks.md", "sft_jax/planning/flops.py", ".ci/run"} <= names
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            found += [
                f"{path.relative_to(REPO)}:{number}: {hit}" for hit in forbidden_references(line)
            ]
    assert not found, "\n".join(found)


def test_reference_check_can_fail():
    assert forbidden_references("run /work/main/.venv/bin/python x (GUIDE §4, issue #8)") == [
        "a machine path: '/work/'",
        "a virtualenv's interpreter: '/work/main/.venv/bin/python'",
        "the internal guide: 'GUIDE'",
        "an issue number: 'issue #8'",
    ]
    assert forbidden_references("PYTHONPATH=. .venv/bin/python x") == [
        "a virtualenv's interpreter: '.venv/bin/python'"
    ]
    assert not forbidden_references("python3 -m venv .venv && . .venv/bin/activate")
    assert not forbidden_references('"$dir/venv/bin/python" -m pip install')  # a CI script's own


# ----------------------------------------------------------------------------- the demo's figures

DEMO_ROWS = {  # a word of each demo table row -> the summary.json comparison metric
    "exact match": "generation_exact",
    "loss per completion token": "eval_loss",
    "token accuracy": "eval_token_accuracy",
    "perplexity on general stories": "general_perplexity",
    "wall time": "wall_s",
}


def demo_table(text: str) -> dict[str, tuple[str, str]]:
    """{metric: (before, after)} of the first markdown table whose header ends in
    `| before | after |`, the cells as written."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(r"\| before \| after \|$", line))
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        label, before, after = [c.strip() for c in line.strip("|").split("|")]
        metric = next(m for word, m in DEMO_ROWS.items() if word in label)
        table[metric] = (before, after)
    return table


def _section(page: str, heading: str) -> str:
    text = (REPO / page).read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _plain(cell: str) -> float:
    return float(re.sub(r"[^\d.]", "", cell))


def test_demo_figures_agree_across_the_docs():
    """README's table is docs/benchmarks.md's; the quickstart's transcript prints the same
    figures; configs/demo.py quotes none (figures that change live in docs/benchmarks.md)."""
    readme = demo_table(_section("README.md", "## What the demo shows"))
    measured = demo_table(_section("docs/benchmarks.md", "## The demo"))
    assert readme == measured, (readme, measured)
    transcript = _section("docs/quickstart.md", "## 2. The demo")
    for metric in ("eval_loss", "eval_token_accuracy", "generation_exact", "general_perplexity"):
        before, after = re.search(rf"\n  {metric} +([\d.]+) +([\d.]+)\n", transcript).groups()
        for printed, quoted in ((before, readme[metric][0]), (after, readme[metric][1])):
            decimals = len(quoted.partition(".")[2])
            assert round(float(printed), decimals) == _plain(quoted), (metric, printed, quoted)
    assert not re.search(r"command\s+took \d+", transcript), "timings go in benchmarks.md"
    docstring = ast.get_docstring(ast.parse((REPO / "configs" / "demo.py").read_text()))
    assert not re.search(r"\d+ s\b|\d+-\d+ s\b", docstring), "demo timings go in benchmarks.md"


def quoted_ranges(text: str) -> set[str]:
    """Measured ranges such as "5.6-7.1x" or "47-61%"."""
    return set(re.findall(r"\d+(?:\.\d+)?-\d+(?:\.\d+)?[x%]", text))


def test_readme_benchmark_figures_are_the_recorded_ones():
    quoted = quoted_ranges(_section("README.md", "## Benchmarks"))
    recorded = quoted_ranges((REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8"))
    assert quoted and quoted <= recorded, quoted - recorded


def test_demo_table_check_can_fail():
    table = "| x | before | after |\n|---|---|---|\n| held-out token accuracy | 0.267 | 1.000 |\n"
    assert demo_table(table) == {"eval_token_accuracy": ("0.267", "1.000")}
    assert demo_table(table.replace("1.000", "0.990")) != demo_table(table)


# ----------------------------------------------------------------------------- commands, run


def _run(command: str, cwd: pathlib.Path, devices: int = 1, timeout: int = 900):
    """A documented command as a user runs it: `python` is this interpreter, the repository is
    importable, and the test suite's 8 fake devices are not inherited unless asked for."""
    words = shlex.split(command)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    # XLA reads a value that does not start with "--" as a file of flags: never leave blanks.
    env["XLA_FLAGS"] = " ".join(flags.split())
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if words[0] == "python":
        words[0] = sys.executable
    return subprocess.run(
        words, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
def test_readme_quick_start_runs_and_prints_the_readme_figures(tmp_path):
    """About a minute on 2 cores: the README's demo command with its exact arguments (the
    workdir moved to tmp; the venv part is the environment this runs in), then the report
    command the README gives for its workdir."""
    quick = _section("README.md", "## Quick start")
    block = re.search(r"```bash\n(.*?)\n```", quick, re.DOTALL).group(1)
    demo = [part.strip() for part in block.split("&&") if part.strip().startswith("python -m")]
    assert len(demo) == 1 and "--workdir /tmp/demo" in demo[0], demo
    workdir = tmp_path / "demo"
    done = _run(demo[0].replace("--workdir /tmp/demo", f"--workdir {workdir}"), REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    got = {row["metric"]: (row["before"], row["after"]) for row in summary["comparison"]}
    readme = demo_table(_section("README.md", "## What the demo shows"))
    for metric, (before, after) in readme.items():
        if metric == "wall_s":
            continue  # machine-dependent: docs/benchmarks.md records it with its machine
        decimals = len(before.partition(".")[2])
        assert round(got[metric][0], decimals) == _plain(before), (metric, got[metric], before)
        if metric in ("generation_exact", "eval_token_accuracy"):
            assert round(got[metric][1], len(after.partition(".")[2])) == _plain(after)
        else:  # the forgetting figure moves by a few % with the gradients' summation order
            assert got[metric][1] == pytest.approx(_plain(after), rel=0.5), (metric, got[metric])
    report = re.search(r"`(python -m sft_jax\.report --workdir\s+/tmp/demo)`", readme_text())
    done = _run(report.group(1).replace("/tmp/demo", str(workdir)), REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "report" / "index.html").stat().st_size > 10000


def readme_text() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- troubleshooting, run


# Transcripts that need a prepared directory: how to make it.
def _tokenizerless_model(tmp: pathlib.Path) -> dict[str, str]:
    model = tmp / "llama31_8b"
    model.mkdir()
    (model / "config.json").write_text(
        (REPO / "sft_jax/assets/stories260K/config.json").read_text()
    )
    return {"/tmp/plan_models/llama31_8b": str(model)}


def _broken_config(tmp: pathlib.Path) -> dict[str, str]:
    path = tmp / "my_config.py"
    path.write_text("from sft_jax.configs import base\nx = = 1\n")  # line 2: invalid syntax
    return {"my_config.py": str(path)}


def _truncated_model(tmp: pathlib.Path) -> dict[str, str]:
    """The bundled model copied with its weights cut at 500,000 bytes (an interrupted copy)."""
    model = tmp / "m"
    shutil.copytree(REPO / "sft_jax/assets/stories260K", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500_000])
    return {"/models/m": str(model)}


def _model_as_workdir(tmp: pathlib.Path) -> dict[str, str]:
    """A workdir holding a Hugging Face model's config.json, as an export leaves it: without
    one the transcript would train the demo into /tmp/demo_hf instead of being refused."""
    workdir = tmp / "demo_hf"
    workdir.mkdir()
    shutil.copy(REPO / "sft_jax/assets/stories260K/config.json", workdir / "config.json")
    return {"/tmp/demo_hf": str(workdir)}


TRANSCRIPT_SETUP = {
    "--workdir /tmp/demo_hf": _model_as_workdir,
    "/tmp/plan_models/llama31_8b": _tokenizerless_model,
    "--model /models/m": _truncated_model,
    "--config my_config.py": _broken_config,
}
TRANSCRIPTS_NOT_RUN = {  # a reason for each transcript the test cannot reproduce
    "/tmp/old_run": "needs a workdir written by an older sft_jax",
    "# after a 100-step run": "needs a finished 100-step run first; the message itself is checked "
    "by tests/test_checkpoint.py::test_schedule_change_says_what_changes",
}


def troubleshooting_transcripts() -> list[tuple[str, list[str]]]:
    """(command, the output lines shown under it) of every `$ ` line on the troubleshooting page."""
    text = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        for chunk in re.split(r"^\$ ", block, flags=re.MULTILINE)[1:]:
            command, *shown = chunk.strip("\n").splitlines()
            out.append((command, shown))
    return out


TRANSCRIPTS = troubleshooting_transcripts()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command,shown", TRANSCRIPTS, ids=[c.replace("python -m ", "")[:100] for c, _ in TRANSCRIPTS]
)
def test_troubleshooting_transcripts_print_what_the_page_shows(command, shown, tmp_path):
    """Each command on the page, run: it still prints every line shown under it (`…` standing
    for shortened parts) and exits with the code shown."""
    for marker, reason in TRANSCRIPTS_NOT_RUN.items():
        if marker in command:
            pytest.skip(reason)
    command, _, comment = command.partition("   # ")  # "   # on 8 devices"
    found = re.search(r"on (\d+) devices", comment)
    devices = int(found.group(1)) if found else 1
    moved = {"--workdir /tmp/w ": f"--workdir {tmp_path / 'w'} "}
    for marker, setup in TRANSCRIPT_SETUP.items():
        if marker in command:
            moved.update(setup(tmp_path))
    for old, new in moved.items():  # in the command and in what it prints
        command = command.replace(old, new)
        shown = [line.replace(old, new) for line in shown]
    done = _run(command, REPO, devices=devices, timeout=600)
    printed = (done.stdout + done.stderr).splitlines()
    code = next((int(s.split(":")[1]) for s in shown if s.startswith("exit code:")), None)
    expected = [s for s in shown if not s.startswith("exit code:")]
    assert code is None or done.returncode == code, (done.returncode, printed[-5:])
    assert done.returncode != 0 or not any(s.startswith("error:") for s in expected), printed[-5:]
    for line in expected:
        pieces = [re.escape(p) for p in line.split(HOLE)]
        assert any(re.fullmatch(".*?".join(pieces), p) for p in printed), (line, printed[-5:])
