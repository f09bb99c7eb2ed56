"""Typed configuration: dataclasses loaded from YAML, validated at load time.

Every setting has exactly one home: a field of a dataclass below or in the module that owns it
(``feedrank.data.simulate.WorldConfig``, ``feedrank.train.trainer.TrainConfig``, ...). YAML files in
``configs/`` only fill those fields in. Loading is strict on purpose: an unknown key or a value of
the wrong type fails immediately with the dotted path of the offending key, because a typo that is
silently ignored costs a whole training run.

Example::

    @dataclass
    class Optim:
        lr: float = 1e-3

    cfg = from_dict(Optim, {"lr": 0.01})          # Optim(lr=0.01)
    from_dict(Optim, {"lr": "fast"})               # ConfigError: optim.lr: expected float, got str 'fast'
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or dict does not match its dataclass."""


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses.

    Missing keys take the dataclass defaults; unknown keys and wrong types raise ``ConfigError``
    naming the full key path (``train.optim.lr``).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = {} if data is None else data
    where = path or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(hints[name], value, key_path)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without default was not given
        raise ConfigError(f"{where}: {exc}") from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return obj


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: no variant of {tp} accepts {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(key_tp, k, f"{path}.{k}"): _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        # YAML reads 1e-3 as a string and 1 as an int; both are reasonable ways to write a float.
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected float, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected float, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected int, got {type(value).__name__} {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected bool, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected str, got {type(value).__name__} {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def to_dict(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass, suitable for YAML/JSON (saved in model bundles)."""
    return dataclasses.asdict(obj)


def load_yaml(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Load ``cls`` from a YAML file, optionally from one top-level ``section`` of it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if section is not None:
        if not isinstance(data, dict) or section not in data:
            raise ConfigError(f"{path}: missing section {section!r}")
        data = data[section]
    try:
        return from_dict(cls, data, section or "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
