"""The `sft-jax` command (one entry point for every tool) and `--help` for the config-driven ones.

`sft-jax train --config ...` is `python -m sft_jax.train --config ...`, and so on for every
subcommand in COMMANDS; `sft-jax` alone (or `python -m sft_jax`) lists them.

train, plan, bench and data take a config file plus `--config.a.b=v` overrides; their `--help`
lists every config key with its default and its comment, read from the base config's source
(sft_jax/configs/base.py), so the help can never disagree with the defaults it documents.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import sys
import textwrap
import tokenize
from typing import Any

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")

# name -> (module whose main() runs it, whether main takes argv[0] as absl does, one line)
COMMANDS: dict[str, tuple[str, bool, str]] = {
    "train": ("sft_jax.train", True, "fine-tune a model: --config FILE --workdir DIR"),
    "data": ("sft_jax.data.__main__", False, "inspect / audit the data a config trains on"),
    "export": ("sft_jax.export", False, "write a Hugging Face directory or PEFT adapter"),
    "generate": ("sft_jax.generate", False, "chat with a workdir or an exported model"),
    "report": ("sft_jax.report", False, "HTML report with charts of a run"),
    "plan": ("sft_jax.plan", True, "memory per device of a config on N devices"),
    "bench": ("sft_jax.bench", True, "tokens/s, MFU and memory of a config's train step"),
}

OVERRIDES_HELP = """\
Overrides: --config.SECTION.KEY=VALUE sets one key after the config file ran, e.g.
  --config.optim.learning_rate=1e-4 --config.train.epochs=2 --config.lora.enabled=True
The value is read as the key's type: numbers, True/False, strings as they are, tuples as
"('q_proj', 'v_proj')". A key that does not exist is an error naming the closest one.
--config FILE:ARG calls the file's get_config(ARG) (a preset). Your own config file, anywhere:

  from sft_jax.configs import base
  def get_config():
      c = base.get_config()
      c.data.train_files = "my_data.jsonl"
      return c
"""


def wants_help(argv: list[str]) -> bool:
    """Whether the command line asks for help (checked before any flag parsing)."""
    return any(arg in HELP_FLAGS for arg in argv)


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    key: str  # dotted, e.g. "optim.learning_rate"
    default: Any
    comment: str  # the comment beside or above the key in base.py, on one line


def documented_keys() -> tuple[list[ConfigKey], dict[str, str]]:
    """Every key of the base config in file order, and each section's heading comment."""
    from sft_jax.configs import base

    source = inspect.getsource(base)
    comments = _comments(source)
    defaults = base.get_config()
    func = next(n for n in ast.parse(source).body if getattr(n, "name", "") == "get_config")
    prefixes: dict[str, str] = {}
    keys: list[ConfigKey] = []
    sections: dict[str, str] = {}
    for node in func.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)):
            continue
        key = prefixes.get(target.value.id, "") + target.attr
        inline = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in comments and not comments[n][1]:
            above.insert(0, comments[n][0])
            n -= 1
        comment = " ".join(inline or above).lstrip("- ").strip()
        if len(node.targets) > 1:  # c.model = m = ConfigDict(): a section
            prefixes[node.targets[1].id] = f"{key}."
            sections[key] = comment.removeprefix(f"{key}:").strip()
            continue
        value = defaults
        for part in key.split("."):
            value = value[part]
        keys.append(ConfigKey(key, value, comment))
    return keys, sections


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment text, whether it follows code on that line)."""
    out, code_lines = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.start[0] in code_lines)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    return out


def config_help() -> str:
    """How overrides work, then every key with its default and comment, grouped by section."""
    keys, sections = documented_keys()
    out = [OVERRIDES_HELP, "Config keys and their defaults (sft_jax/configs/base.py):"]
    section = None
    for k in keys:
        head = k.key.rsplit(".", 1)[0] if "." in k.key else ""
        if head != section:
            section = head
            if head:
                out.append(f"\n[{head}] {sections.get(head, '')}".rstrip())
        value = repr(tuple(k.default) if isinstance(k.default, list) else k.default)
        out.append(f"  {k.key} = {value}")
        if k.comment:
            out.extend(
                textwrap.wrap(k.comment, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
            )
    return "\n".join(out) + "\n"


def absl_help(usage: str, description: str, flag_values: Any) -> str:
    """Help for a command whose flags are absl flags (train, plan, bench), config keys last."""
    out = [f"usage: {usage}", "", description, "", "Flags:"]
    out.append(f"  {'--config FILE[:ARG]':<24}the config file (a Python file with get_config())")
    for name in flag_values:
        flag = flag_values[name]
        if name == "config" or flag.name != name:  # aliases are listed under their flag
            continue
        default = "" if flag.default is None else f" (default: {flag.default})"
        out.append(f"  {'--' + name:<24}{flag.help}{default}")
    out.append(f"  {'-h, --help':<24}this help")
    return "\n".join(out) + "\n\n" + config_help()


def print_commands(file: Any = None) -> None:
    print("usage: sft-jax COMMAND [ARGS ...]   (COMMAND --help for its flags)\n", file=file)
    print("Commands:", file=file)
    for name, (_, _, summary) in COMMANDS.items():
        print(f"  {name:<9} {summary}", file=file)
    print("\nEach is also `python -m sft_jax.COMMAND` (data: `python -m sft_jax.data`).", file=file)


def main(argv: list[str] | None = None) -> int:
    """`sft-jax COMMAND ARGS...` -> the command's own main(); its exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in HELP_FLAGS:
        print_commands()
        return 0
    if args[0] not in COMMANDS:
        print(f"sft-jax: unknown command '{args[0]}'", file=sys.stderr)
        print_commands(sys.stderr)
        return 2
    module, absl_style, _ = COMMANDS[args[0]]
    command_main = importlib.import_module(module).main
    rest = args[1:]
    try:
        return command_main([f"sft-jax {args[0]}", *rest] if absl_style else rest) or 0
    except KeyboardInterrupt:  # Ctrl-C in an export, a report, ...: no traceback
        return interrupted(f"sft-jax {args[0]}")


def interrupted(command: str) -> int:
    """Ctrl-C ends a command with one line and exit code 130 (the shell's for SIGINT): the user
    stopped it on purpose, a traceback would read like a crash."""
    print(f"\n{command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
