"""Recipe configs: a frozen dataclass per recipe, filled from defaults <- YAML file <- command-line flags.

Every field becomes a flag of the same name (`--train_batch_size 4`); booleans also accept `--flag` alone and
`--flag false`; tuples take comma-separated values, or several (`--crop_scale 0.5 1`). `--config FILE.yaml`
supplies the same keys. Unknown keys and flags are reported together, each with a "did you mean" hint; all invalid
values are reported in one error. A config class may name other tools' flags: `ALIASES` (another name of a field,
accepted) and `INSTEAD` (a flag with no counterpart: refused, saying what to use instead).
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
from .optim import OPTIMIZERS
from ..lora.config import LoRAConfig

C = TypeVar("C")

# One spelling of the LoRA settings in both recipes: rank, lora_alpha, lora_dropout, rank_pattern and targets (the SD
# recipe names its two target lists unet_targets and text_encoder_targets). Other spellings are accepted as aliases.
LORA_ALIASES: dict[str, str] = {"lora_rank": "rank", "lora_targets": "targets"}


@dataclasses.dataclass(frozen=True)
class TrainingFeatures:
    """The training-feature flags both recipes share (the same names, YAML keys, help and checks): the optimizer and
    an EMA of the trained weights. A recipe's config inherits them and adds `feature_problems()` to its checks."""

    optimizer: str = "adamw"
    """adamw, adamw8bit (bitsandbytes), prodigy (prodigyopt; use learning rates near 1.0), schedulefree (schedulefree's
    AdamW; evaluated and saved at its averaged weights) or adafactor."""
    use_ema: bool = False
    """Keep an exponential moving average of the trained weights: validation uses it, and it is saved beside the
    plain result as adapter_ema.safetensors (SD: + adapter_ema_kohya.safetensors; both: + peft_ema/ with
    --save_peft)."""
    ema_decay: float = 0.999
    """EMA decay per optimizer step (ema = decay x ema + (1 - decay) x weights)."""
    ema_cpu: bool = False
    """Keep the EMA copy in CPU memory (saves accelerator memory; one copy to the host per step)."""

    def feature_problems(self) -> list[str]:
        """Every invalid training-feature value, one line each."""
        out = []
        if self.optimizer not in OPTIMIZERS:
            close = difflib.get_close_matches(self.optimizer, OPTIMIZERS, n=1)
            out.append(f"optimizer={self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}"
                       + (f" (did you mean {close[0]!r}?)" if close else ""))
        if not 0 < self.ema_decay < 1:
            out.append(f"ema_decay={self.ema_decay}: expected a number in (0, 1), e.g. 0.999")
        return out


@dataclasses.dataclass(frozen=True)
class AdapterKindFields:
    """The adapter-kind settings both recipes share (flags `--adapter_type`, `--lokr_factor`, ...); a recipe config
    inherits them. Their names match LoRAConfig's (lora.config) except the `lokr_` prefix of the LoKr switches."""

    adapter_type: str = "lora"
    """Kind of the trained layers: lora, loha, lokr or dora (LoRA with a DoRA magnitude); see lora.kinds."""
    lokr_factor: int = -1
    """LoKr: split each side of a weight with this factor (-1: as square as possible)."""
    lokr_full_rank: bool = False
    """LoKr: keep the second Kronecker factor whole (full rank) instead of splitting it at the rank."""
    lokr_decompose_both: bool = False
    """LoKr: also split the first Kronecker factor into two rank-r matrices."""

    def kind_settings(self) -> dict[str, Any]:
        """The LoRAConfig keyword arguments of these settings."""
        return {"adapter_type": self.adapter_type, "lokr_factor": self.lokr_factor,
                "full_rank": self.lokr_full_rank, "decompose_both": self.lokr_decompose_both}

    def kind_problems(self) -> list[str]:
        """Problems of these settings (LoRAConfig's own checks, so the rules live in one place)."""

        try:
            LoRAConfig(**self.kind_settings())
        except ConfigError as e:
            lines = [ln.strip(" -") for ln in str(e).splitlines()[1:]] or [str(e)]
            return [ln.replace("full_rank", "lokr_full_rank").replace("decompose_both", "lokr_decompose_both")
                    for ln in lines]
        return []


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
        # A string (or each string of a flag's several values: --crop_scale 0.5 1) holds comma-separated items.
        items: list[Any] = []
        for part in [value] if isinstance(value, str) else list(value):
            items += [v.strip() for v in part.split(",") if v.strip()] if isinstance(part, str) else [part]
        return tuple(_coerce(name, v, inner) for v in items)
    if origin is dict:
        if isinstance(value, str) and not value.strip().startswith("{") and "=" in value:  # key=value,key=value
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("expected key=value pairs separated by commas, or a JSON object")
            inner = typing.get_args(base)[1] if len(typing.get_args(base)) == 2 else str
            return {k.strip(): _coerce(f"{name}[{k.strip()}]", v.strip(), inner) for k, v in pairs}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON ({err.msg} at character {err.pos}); expected a JSON object such "
                                 """as '{"re:.*up_blocks.*": 8}' (quote it for the shell)""") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping (a JSON object such as '{{\"to_q\": 8}}'), got {type(value).__name__}")
        return dict(value)
    return value


def _hint(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _field_help(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after each field), used as flag help; fields inherited from a
    shared base (TrainingFeatures) keep the base's text."""
    import ast
    import inspect

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's own text wins
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(getattr(nxt, "value", None), ast.Constant):
                out[node.target.id] = str(nxt.value.value)
    return out


def build_parser(cls: type, prog: str, description: str, other_defaults: tuple[str, dict] | None = None,
                 epilog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of dataclass `cls` (defaults suppressed) plus `--config`.

    `other_defaults` is (when, values): values that replace the defaults in some runs, shown next to them in --help
    (e.g. ("without a model, configs/tiny.yaml", {"max_train_steps": 200})).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False, epilog=epilog,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with the same keys as the flags; flags override it")
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    when, others = other_defaults or ("", {})
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    for f in dataclasses.fields(cls):
        base, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f"{helps.get(f.name, '')} (default: {default!r}"
        if f.name in others and others[f.name] != default:
            text += f"; {when}: {others[f.name]!r}"
        text = text.replace("%", "%%") + ")"
        also = [f"--{a}" for a, name in aliases.items() if name == f.name]
        if also:
            text += f"; also accepted as {', '.join(also)}"
        if base is bool:
            parser.add_argument(f"--{f.name}", nargs="?", const="true", help=text)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(f"--{f.name}", nargs="+", help=text)
        else:
            parser.add_argument(f"--{f.name}", help=text)
    for alias, name in aliases.items():
        parser.add_argument(f"--{alias}", dest=f"alias:{alias}", metavar=alias.upper(), help=f"the same as --{name}")
    return parser


def _alias_problems(cls: type, values: dict[str, Any], given: dict[str, Any], where: str) -> list[str]:
    """Move aliased keys of `given` into `values` (in place); problems when both names are given."""
    out = []
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    for name in dict.fromkeys(aliases.values()):
        spelled = [a for a, n in aliases.items() if n == name and a in given] + ([name] if name in given else [])
        if len(spelled) > 1:
            out.append(f"{where}{' and '.join(spelled)} are the same setting; give only --{name}")
        elif spelled and spelled[0] != name:
            values[name] = given[spelled[0]]
    return out


def load_config(cls: type[C], argv: Sequence[str] | None, prog: str = "train", description: str = "",
                other_defaults: tuple[str, dict] | None = None, epilog: str | None = None) -> C:
    """Parse `argv` (flags and `--config FILE.yaml`) into a validated, frozen `cls`.

    Raises ConfigError listing every unknown key/flag (with "did you mean") and every invalid value.
    `other_defaults` and `epilog` only change what --help shows (see build_parser).
    """
    parser = build_parser(cls, prog, description, other_defaults, epilog)
    args, unknown = parser.parse_known_args(list(argv) if argv is not None else None)
    flags = vars(args)
    names = [f.name for f in dataclasses.fields(cls)]
    instead: dict[str, str] = getattr(cls, "INSTEAD", {})
    problems: list[str] = []
    skip_value = False
    for item in unknown:
        if item.startswith("--"):
            key = item[2:].split("=", 1)[0]
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            if key in instead:
                problems.append(f"--{key}: {instead[key]}")
            else:
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
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--config {config_path}: not valid YAML{where} ({what}); expected 'key: value' lines "
                              "with the same keys as the flags") from None
        except (UnicodeDecodeError, OSError) as err:
            raise ConfigError(f"--config {config_path}: could not be read as a UTF-8 text file ({err}); expected "
                              "a YAML file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{config_path}: expected a mapping of keys to values at the top, got {type(data).__name__}")
        aliases = getattr(cls, "ALIASES", {})
        for key in data:
            if key in instead:
                problems.append(f"{config_path}: {key}: {instead[key]}")
            elif key not in names and key not in aliases:
                problems.append(f"{config_path}: unknown key {_hint(str(key), names)}")
        values.update({k: v for k, v in data.items() if k in names})
        problems += _alias_problems(cls, values, data, f"{config_path}: ")
    given = {k.split(":", 1)[1]: flags.pop(k) for k in list(flags) if k.startswith("alias:")}
    problems += _alias_problems(cls, values, dict(flags, **given), "")
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
    else:  # a config class that does not check itself on construction still lists its problems
        problems += config.problems() if hasattr(config, "problems") else []
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
