"""Recipe configs: a frozen dataclass per recipe, filled from defaults <- YAML file <- command-line flags.

Every field becomes a flag of the same name (`--train_batch_size 4`); booleans also accept `--flag` alone and
`--flag false`; tuples take comma-separated values. `--config FILE.yaml` supplies the same keys. Unknown keys and
flags are reported together, each with a "did you mean" hint; all invalid values are reported in one error.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from ..io import atomic_write_text
from ..lora.config import ConfigError

C = TypeVar("C")


def _str2bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on", "y"):
        return True
    if low in ("0", "false", "no", "off", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type of an annotation, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or flag value to the field type; raises ValueError with a readable message."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{name}: None is not allowed; expected {getattr(base, '__name__', base)}")
    origin = typing.get_origin(base)
    if base is bool:
        return value if isinstance(value, bool) else _str2bool(value)
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name}={value!r}: expected an integer")
        return int(value)
    if base is float:
        return float(value)
    if base is str:
        return str(value)
    if origin is tuple:
        inner = typing.get_args(base)[0]
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        return tuple(_coerce(name, v, inner) for v in items)
    if origin is dict:
        return dict(json.loads(value)) if isinstance(value, str) else dict(value)
    return value


def _hint(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _field_help(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after each field), used as flag help."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    out: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant):
            out[node.target.id] = str(nxt.value.value)
    return out


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of dataclass `cls` (defaults suppressed) plus `--config`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with the same keys as the flags; flags override it")
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f"{helps.get(f.name, '')} (default: {default!r})"
        if base is bool:
            parser.add_argument(f"--{f.name}", nargs="?", const="true", help=text)
        else:
            parser.add_argument(f"--{f.name}", help=text)
    return parser


def load_config(cls: type[C], argv: Sequence[str] | None, prog: str = "train", description: str = "") -> C:
    """Parse `argv` (flags and `--config FILE.yaml`) into a validated, frozen `cls`.

    Raises ConfigError listing every unknown key/flag (with "did you mean") and every invalid value.
    """
    parser = build_parser(cls, prog, description)
    args, unknown = parser.parse_known_args(list(argv) if argv is not None else None)
    flags = vars(args)
    names = [f.name for f in dataclasses.fields(cls)]
    problems: list[str] = []
    skip_value = False
    for item in unknown:
        if item.startswith("--"):
            key = item[2:].split("=", 1)[0]
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            problems.append(f"unknown flag --{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
            skip_value = "=" not in item
        elif skip_value:  # the value of an unknown flag
            skip_value = False
        else:
            problems.append(f"unexpected argument {item!r} (flags are written --name value)")
    values: dict[str, Any] = {}
    config_path = flags.pop("config", None)
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {config_path!r} does not exist; expected a YAML file")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{config_path}: expected a mapping of keys to values at the top, got {type(data).__name__}")
        for key in data:
            if key not in names:
                problems.append(f"{config_path}: unknown key {_hint(str(key), names)}")
        values.update({k: v for k, v in data.items() if k in names})
    values.update(flags)
    hints = typing.get_type_hints(cls)
    converted: dict[str, Any] = {}
    for key, value in values.items():
        try:
            converted[key] = _coerce(key, value, hints[key])
        except (ValueError, TypeError, argparse.ArgumentTypeError, json.JSONDecodeError) as err:
            problems.append(f"{key}={value!r}: {err}")
    try:
        config = cls(**converted)
    except ConfigError as err:  # report the values' problems together with the unknown keys
        problems += [line[4:] for line in str(err).splitlines() if line.startswith("  - ")] or [str(err)]
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain YAML/JSON-friendly dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); `--config` reads it back."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return Path(path)
