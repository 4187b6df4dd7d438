"""One typed config system: dataclasses loaded from YAML/dicts and validated.

Every config in the project (model, data, training, experiment) is a plain
``@dataclass``. :func:`from_dict` builds one from a mapping, checking:

* unknown keys (the error names the dotted path, e.g. ``model.hiden_size``, and
  suggests the closest known field),
* types (``int``, ``float``, ``bool``, ``str``, ``Optional[...]``, ``Literal[...]``,
  ``list[...]``, ``dict[str, ...]`` and nested dataclasses),
* then the dataclass's own ``validate()`` method, if it has one, for cross-field
  rules (raise :class:`ConfigError` with the field name).

Errors are :class:`ConfigError` and always name the file (when loaded from one)
and the field.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import UserError

T = TypeVar("T")

#: a number YAML 1.1 leaves a string (scientific notation without a dot: 5e-4, 1E6)
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")

__all__ = ["ConfigError", "from_dict", "to_dict", "load_yaml", "save_yaml", "apply_overrides", "redact_secrets",
           "redact_argv", "REDACTED"]

#: what a credential is replaced by wherever a config is saved, printed or logged; a saved
#: config read back treats it as unset (``data_shards.StorageConfig.to_options``)
REDACTED = "***"

#: keys whose values are credentials (storage sections: ``data.storage``, ``checkpoint.storage``)
SECRET_KEYS = frozenset({"key", "secret", "token", "password", "api_key"})


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the field (and file)."""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _tagged_members(members: tuple) -> dict[str, Any]:
    """``{tag: member}`` when every (non-None) member of a Union is a dataclass whose ``type``
    field is a one-value ``Literal`` (a tagged union, e.g. the experiment's model section)."""
    out: dict[str, Any] = {}
    for m in members:
        if m is type(None):
            continue
        if not (isinstance(m, type) and dataclasses.is_dataclass(m)):
            return {}
        hint = typing.get_type_hints(m).get("type")
        if get_origin(hint) is not Literal or len(get_args(hint)) != 1:
            return {}
        out[get_args(hint)[0]] = m
    return out


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        if value is None and type(None) in args:
            return None
        tagged = _tagged_members(args)
        if tagged and isinstance(value, Mapping):   # a section selected by its `type` key
            kind = value.get("type", next(iter(tagged)))
            if kind not in tagged:
                raise ConfigError(f"{path}.type: must be one of {list(tagged)}, got {kind!r}")
            return _convert(value, tagged[kind], path)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except ConfigError as e:  # try the next member
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, _path=path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)   # YAML 1.1 reads 5e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, _path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating keys, types and invariants."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]  # T: a dataclass
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        where = f"{_path}.{k}" if _path else k
        close = difflib.get_close_matches(k, list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: unknown key{hint}; known keys of {cls.__name__}: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{_path}.{name}" if _path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required field is missing")
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{_path + ': ' if _path else ''}{e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(f"{_path}.{msg}" if _path else msg) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (recursively), ready for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def redact_secrets(mapping: Any, _parent: str = "") -> Any:
    """A copy of a config mapping (or dataclass) with credentials replaced by ``"***"``:
    the values of ``SECRET_KEYS`` inside any ``storage`` section, and any ``*_token`` /
    ``*_secret`` key. What ``--print-config`` and the trackers show."""
    if dataclasses.is_dataclass(mapping):
        mapping = to_dict(mapping)
    if isinstance(mapping, Mapping):
        out = {}
        for k, v in mapping.items():
            secret = (_parent == "storage" and k in SECRET_KEYS) or str(k).endswith(("_token", "_secret"))
            out[k] = REDACTED if secret and v not in (None, "") else redact_secrets(v, str(k))
        return out
    if isinstance(mapping, (list, tuple)):
        return [redact_secrets(v, _parent) for v in mapping]
    return mapping


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with the values of credential overrides (``data.storage.secret=X``,
    ``...token=X``: what :func:`redact_secrets` hides) replaced by ``***``."""
    out = []
    for a in argv:
        key, eq, _ = a.partition("=")
        parts = key.split(".")
        nested = {parts[-2]: {parts[-1]: "x"}} if len(parts) > 1 else {parts[-1]: "x"}
        if eq and REDACTED in str(redact_secrets(nested)):
            a = f"{key}={REDACTED}"
        out.append(a)
    return out


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected KEY=VALUE (e.g. train.epochs=3)")
        key, val = ov.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
        node[parts[-1]] = _parse_scalar(val)
    return data


def load_yaml(cls: type[T], path: str | os.PathLike, overrides: list[str] | None = None) -> T:
    """Load dataclass ``cls`` from a YAML file; errors name the file and field."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def save_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write a config as YAML with credentials redacted (:func:`redact_secrets`): the run's and
    every checkpoint's ``config.yaml`` (also uploaded with S3 checkpoints) never hold one."""
    Path(path).write_text(yaml.safe_dump(redact_secrets(obj), sort_keys=False))
