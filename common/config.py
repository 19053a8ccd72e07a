"""Reading a config: YAML (safe_load's loader, refusing a key given twice in a section) into
the schema (common/schema.py), then `a.b=value` overrides, each value type-checked and
constrained where it is read.

Overrides apply in order: a key given twice on the command line takes the later value, as
command lines do (`train.epochs=3 train.epochs=5` trains 5 epochs).

Unknown keys (with a close match suggested), wrong types, values outside a key's choices and
values that break a key's constraint are `UserError`s naming the key, one line each.

Why hand-written and not pydantic or OmegaConf: the GPU machines the project is checked on
have neither and cannot install packages, and what the project needs is small: nested
dataclasses, `Literal` choices, optional values, lists of strings, constraints beside keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import yaml

from common.errors import UserError
from common.schema import RUNTIME, Check, Config

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
__all__ = ["Config", "apply_override", "flatten", "load_config", "runtime_keys", "to_dict",
           "to_yaml"]


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config, apply `a.b=value` overrides; `run.name` defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as exc:
        raise UserError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    cfg = _build(Config, raw, prefix="", source=str(path))
    given = (cfg.model.name, cfg.data.name)
    for item in overrides:
        apply_override(cfg, item)
    if not cfg.run.name and not cfg.run.dir:
        cfg.run.name = run_name(path.stem, cfg, given)
    # run.dir stays empty unless given: its default may need the number of workers
    # (train/run/location.py: settle_run_dir, called by the launcher, the doctor and the workers).
    return cfg


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error naming both lines
    (YAML's spec forbids it; PyYAML silently keeps the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice in one section (lines "
                                    f"{seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def run_name(stem: str, cfg: Config, given: tuple[str, str]) -> str:
    """The config file's name, plus the model and the data when overrides changed either
    (`default-resnet18-imagefolder`): a run is named after what it trains."""
    if (cfg.model.name, cfg.data.name) == given:
        return stem
    model = cfg.model.name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]  # torchvision.resnet18
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", part).strip("_.") or "x"
                    for part in (stem, model, cfg.data.name))


def apply_override(cfg: Config, item: str) -> None:
    """Set one dotted key from `key=value`; the value is read as YAML, then type-checked."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
    *parents, leaf = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parents):
        full = ".".join(parents[: i + 1])
        if not dataclasses.is_dataclass(node):
            raise UserError(f"config: {full.rsplit('.', 1)[0]} is a value, not a section")
        _check_known(type(node), part, full)
        node = getattr(node, part)
        if not dataclasses.is_dataclass(node):
            raise UserError(f"config: {full} is a value, not a section")
    _check_known(type(node), leaf, key)
    tp = _hints(type(node))[leaf]
    if dataclasses.is_dataclass(tp):
        raise UserError(f"config: {key} is a section; set one of its keys, e.g. {key}.<key>=...")
    setattr(node, leaf, _coerce(_parse_value(text, tp), tp, key))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config as written into the run folder (and logged to wandb)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def runtime_keys(cls: type = Config, prefix: str = "") -> frozenset[str]:
    """The dotted keys marked RUNTIME in the schema: how a run is launched or looked at."""
    keys: set[str] = set()
    for name, tp in _hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys |= runtime_keys(tp, f"{prefix}{name}.")
        elif RUNTIME in _extras(tp):
            keys.add(f"{prefix}{name}")
    return frozenset(keys)


# --- building and type checking -----------------------------------------------------------


@functools.cache  # evaluating the schema's annotations took most of a load_config's 28 ms
def _hints(cls: type) -> types.MappingProxyType[str, Any]:
    return types.MappingProxyType(get_type_hints(cls, include_extras=True))


def _extras(tp: Any) -> tuple[Any, ...]:
    return get_args(tp)[1:] if get_origin(tp) is Annotated else ()


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {prefix.rstrip('.')} must be a section (a mapping)")
    hints = _hints(cls)
    values = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        _check_known(cls, str(key), full, source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value or {}, full + ".", source)
        else:
            values[key] = _coerce(value, tp, full, source)
    return cls(**values)


def _check_known(cls: type, key: str, full: str, source: str = "config") -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if key in names:
        return
    close = difflib.get_close_matches(key, names, n=1)
    parent = full[: len(full) - len(key)]
    hint = f" (did you mean {parent}{close[0]}?)" if close else ""
    raise UserError(f"{source}: unknown key {full!r}{hint}")


def _parse_value(text: str, tp: Any) -> Any:
    # Strings stay verbatim (run.name=2024 is the string "2024"); everything else is YAML.
    if _is_text(tp) and text.strip().lower() not in ("null", "~", "none"):
        return text
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _is_text(tp: Any) -> bool:
    origin = get_origin(tp)
    if tp is str:
        return True
    if origin is Annotated:
        return _is_text(get_args(tp)[0])
    if origin is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_is_text(a) for a in get_args(tp) if a is not type(None))
    return False


def _coerce(value: Any, tp: Any, key: str, source: str = "config") -> Any:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extras = get_args(tp)
        value = _coerce(value, base, key, source)
        for check in extras:
            if isinstance(check, Check) and value is not None:
                failure = check.failure(key, value)
                if failure:
                    raise UserError(f"{source}: {failure}")
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise UserError(f"{source}: {key} must be one of {', '.join(map(str, choices))}; "
                        f"got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        return _coerce(value, args[0], key, source)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{source}: {key} expects a list, e.g. [a, b]; got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    return _scalar(value, tp, key, source)


def _scalar(value: Any, tp: Any, key: str, source: str) -> Any:
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string; it means the number
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
        raise UserError(f"{source}: {key} expects {names.get(tp, str(tp))}; got {value!r}")
    if tp is float and not math.isfinite(value):  # YAML reads .nan and .inf as numbers
        raise UserError(f"{source}: {key} expects a finite number; got {value!r}")
    return float(value) if tp is float else value
