"""Reading a config file and the `--config.a.b=v` command line into a parsed `Config`.

Everything that can go wrong here is the user's input (a missing file, a syntax error, a wrong
type set in the file, a misspelt override), so every failure is a one-line `ConfigError` naming the
file and line or the flag, which the commands turn into exit code 2. The file is executed once,
here, and the overrides are applied to the tree it returned, so an error inside the file is never
reported through absl's flag machinery (which flattens a whole traceback into one message).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from typing import Any

import ml_collections

from sft_jax.config import ConfigError, parse

# sft_jax.config re-exports this module's functions at its end; importing it lazily inside the
# functions keeps either import order working.


def make_configs_importable(config_path: str) -> None:
    """Lets a config file in a `configs` directory import its siblings (`from configs import
    demo`) wherever the command is run from.

    The root is the parent of the nearest enclosing `configs` directory, so files in
    subdirectories (configs/bench/x.py) import the same way; otherwise the file's grandparent.
    The base config needs none of this: it is `from sft_jax.configs import base`.
    """
    directory = os.path.dirname(os.path.abspath(config_path.split(":")[0]))
    package = os.path.dirname(os.path.abspath(sys.modules["sft_jax"].__file__))
    if directory.startswith(package + os.sep):  # sft_jax/configs/base.py: already importable,
        return  # and sft_jax/ on sys.path would shadow packages (`configs`, `data`)
    root = os.path.dirname(directory)
    probe = directory
    while os.path.dirname(probe) != probe:
        if os.path.basename(probe) == "configs":
            root = os.path.dirname(probe)
            break
        probe = os.path.dirname(probe)
    if root not in sys.path:
        sys.path.insert(0, root)


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(arg)` for `path:arg`) of a config file, unparsed.

    Raises ConfigError in one line: the file is missing, does not parse (file:line), raises while
    running (the deepest line of the user's own files), or has no `get_config`.
    """
    file_path, _, arg = path.partition(":")
    if os.path.isdir(file_path):  # "not found" misled about a path that exists
        raise ConfigError(f"config file {file_path} is a directory; name the .py file in it")
    if not os.path.isfile(file_path):
        raise ConfigError(f"config file not found: {file_path}")
    make_configs_importable(file_path)
    spec = importlib.util.spec_from_file_location(
        f"sft_jax_config_{abs(hash(file_path))}", file_path
    )
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError(f"{file_path}: defines no get_config() function")
        config = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except SyntaxError as e:
        where = f"{e.filename or file_path}:{e.lineno}" if e.lineno else file_path
        raise ConfigError(f"{where}: syntax error in config file: {e.msg}") from None
    except Exception as e:
        raise ConfigError(f"{_user_line(e, file_path)}: {_one_line(e)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"{file_path}: get_config() returned {type(config).__name__}, not a ConfigDict"
        )
    return config


def _user_line(error: BaseException, file_path: str) -> str:
    """`file:line` of the deepest traceback frame in the user's files (not in an installed
    library or in sft_jax itself), where a config file's mistake is; else the config file."""
    library_dirs = tuple(
        os.path.dirname(os.path.abspath(m.__file__))
        for m in (os, ml_collections, sys.modules["sft_jax"])
    )
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if not os.path.abspath(f.filename).startswith(library_dirs)
        and "site-packages" not in f.filename
        and not f.filename.startswith("<")
    ]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else file_path


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the `--config FILE[:arg]` value or None, argv without it); `--config.a.b=v` stay."""
    path, rest, skip = None, [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path, skip = argv[i + 1], True
        else:
            rest.append(arg)
    return path, rest


def config_from_argv(argv: list[str], flag_values: Any) -> Any:
    """Parses `--config FILE[:arg] [--config.a.b=v ...]` (plus flags already defined on
    `flag_values`, an absl FlagValues; argv[0] is the program) into a Config; -> ConfigError."""
    from absl import flags
    from ml_collections import config_flags

    path, rest = split_config_flag(argv)
    if path is None:
        raise ConfigError("--config FILE is required (--help lists the flags and config keys)")
    raw = load_config_file(path)
    check_override_keys(rest, raw)
    try:
        holder = config_flags.DEFINE_config_dict(
            "config",
            raw,
            "The config file's tree, with --config.a.b=v overrides applied.",
            flag_values=flag_values,
            lock_config=True,
            sys_argv=rest,  # overrides are read from here, not from the global sys.argv
        )
        flag_values(rest)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"bad command-line flag: {_flag_message(e)}") from None
    return parse(holder.value)


def check_override_keys(argv: list[str], raw: ml_collections.ConfigDict) -> None:
    """Every `--config.a.b=v` names an existing key; else ConfigError naming the closest one."""
    import difflib

    for arg in argv:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config.") :].split("=", 1)[0]
        node, done = raw, []
        for part in dotted.split("."):
            names = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
                hint = f"; did you mean '{'.'.join([*done, close[0]])}'?" if close else ""
                key = ".".join([*done, part])
                raise ConfigError(f"unknown config key '{key}' in {arg}{hint}")
            node = node[part]
            done.append(part)


def _flag_message(error: BaseException) -> str:
    """The message of an absl / ml_collections flag error on one line, quotes intact (a KeyError,
    possibly wrapped in an AttributeError, stringifies as the repr of its argument)."""
    message: Any = error
    while isinstance(message, BaseException):
        inner = message.args[0] if len(message.args) == 1 else str(message)
        if isinstance(message, KeyError) or isinstance(inner, BaseException):
            message = inner
        else:
            message = str(message)
    return " ".join(str(message).split())
