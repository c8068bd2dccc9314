"""The one config mechanism of every command: typed dataclasses -> YAML -> `key=value` overrides, validated once.

    cfg = load(Config, "configs/train/tiny_cpu.yaml", ["optim.lr=1e-3", "train.steps=20"])

Override syntax (the same for every command, documented once in the README's command table):
  * `a.b.c=VALUE` sets a dotted key; VALUE is read as YAML: `3e-3` and `1e-4` are numbers, `true` a bool,
    `[0.4, 1.0]` a list, `{critique: {plan: false}}` a mapping, `null` None;
  * `a.b=` (nothing after `=`) sets the empty string; `a.b=null` sets None (where the field allows it).
An unknown key is refused by its dotted name with the closest known keys ("did you mean optim.lr?"); a value of
the wrong type names the key, what was expected and what was given. Fields may carry a one-line doc and
allowed values (`setting(default, doc, choices)`); `describe` lists them for a command's --help-config.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file, key or value is invalid; the message names the file or key, what was expected and got."""


def setting(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A dataclass field with its one-line doc (and allowed values) in the metadata."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---- reading -----------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is {})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value read as YAML; "" when nothing follows `=`)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A deep copy of the nested mapping `data` with each `a.b=value` override set in it."""
    data = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        set_path(data, parts, value, where=f"override {item!r}")
    return data


def set_path(data: dict[str, Any], parts: list[str], value: Any, where: str = "") -> None:
    """data[a][b][c] = value for parts [a, b, c], making the sections on the way."""
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(_at(where, f"{part!r} is a value, not a section"))
    node[parts[-1]] = value


def field_type(cls: type, key: str) -> Any:
    """The annotated type of the dotted field `key` of dataclass `cls` (e.g. "flow.num_timesteps" -> int)."""
    head, _, rest = key.partition(".")
    tp = typing.get_type_hints(cls)[head]
    return field_type(tp, rest) if rest else tp


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (a nested mapping merges; any other value replaces)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults -> YAML file -> overrides, built into `cls` (types checked; `cls.validate()` run if it has one)."""
    data = read_yaml(path) if path else {}
    if path:
        _build(cls, data, "", _Ctx(cls, str(path)))  # a bad key or value in the file is named with the file
    return build(cls, apply_overrides(data, overrides))


def build(cls: type, data: Any, where: str = "", prefix: str = "") -> Any:
    """Dataclass `cls` from a nested mapping: defaults for absent keys, every value checked against its field's
    type and choices, unknown keys refused with suggestions; then `validate()` when `cls` has one. `where` (a
    file name) prefixes messages; `prefix` (e.g. "options.") the keys they name."""
    obj = _build(cls, data, prefix, _Ctx(cls, where, prefix))
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


@dataclasses.dataclass(frozen=True)
class _Ctx:
    root: type  # the dataclass being built (suggestions come from all its keys)
    where: str = ""  # a file name, prefixed to messages
    prefix: str = ""  # the root's own key prefix, e.g. "options."


def _build(cls: type, data: Any, prefix: str, ctx: _Ctx) -> Any:
    here = prefix.rstrip(".") or "config"
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(_at(ctx.where, f"{here}: expected a mapping, got {data!r}"))
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in known:
            raise ConfigError(_at(ctx.where, unknown_key_message(f"{prefix}{name}", ctx, sorted(known))))
    kwargs = {
        name: _coerce(hints[name], value, f"{prefix}{name}", known[name].metadata.get("choices"), ctx)
        for name, value in data.items()
    }
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, choices: tuple | None, ctx: _Ctx) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(_at(ctx.where, f"{key}: expected {expected}, got {value!r}"))

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key, choices, ctx)
        return value
    if origin is typing.Literal:
        if value not in args:
            raise bad(f"one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", ctx)
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"a list of {len(args)} values")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_coerce(a, v, f"{key}[{i}]", None, ctx) for i, (a, v) in pairs)
        items = [_coerce(args[0], v, f"{key}[{i}]", None, ctx) for i, v in enumerate(value)] if args else value
        return tuple(items) if origin is tuple else items
    if tp is list and not isinstance(value, list):
        raise bad("a list")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", None, ctx) for k, v in value.items()} if args else value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true/false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise bad("a string")
    if choices is not None and value not in choices:
        raise bad(f"one of {list(choices)}")
    return value


def _at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the dataclass `cls` (sections expanded; list-of-section entries as `key[]`)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{prefix}{f.name}.")
        elif inner:
            keys += leaf_keys(inner[0], f"{prefix}{f.name}[].")
        else:
            keys.append(prefix + f.name)
    return keys


def unknown_key_message(key: str, ctx: _Ctx, siblings: list[str]) -> str:
    """`train.lr: unknown key; did you mean optim.lr?` with the closest known keys of the whole config."""
    everything = leaf_keys(ctx.root, ctx.prefix)
    name = key.rsplit(".", 1)[-1]
    close = [k for k in everything if k.rsplit(".", 1)[-1] == name]  # train.lr -> optim.lr
    if not close:  # a typo: optim.lrr -> optim.lr, data.image_sise -> ...image_size
        leaf_names = {k.rsplit(".", 1)[-1] for k in everything} | set(siblings)
        names = difflib.get_close_matches(name, leaf_names, n=3, cutoff=0.6)
        parent = key.rpartition(".")[0]
        here = [f"{parent}.{n}" if parent else n for n in names if n in siblings]  # same section first
        close = here or [k for k in everything if k.rsplit(".", 1)[-1] in names]
    hint = f"did you mean {' or '.join(close[:3])}?" if close else f"expected one of {siblings}"
    return f"{key}: unknown key; {hint}"


# ---- writing -----------------------------------------------------------------------------------------


def to_dict(obj: Any) -> dict[str, Any]:
    """The config as plain data (tuples as lists), as YAML writes it."""
    return _plain(dataclasses.asdict(obj))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf field: `dotted.key = default  # doc (one of [...])` (for --help-config)."""
    lines = []
    defaults = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        doc = f.metadata.get("doc", "")
        inner = [a for a in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(a)]
        if inner:  # a list of sections, e.g. data.sources
            lines.append(f"  {prefix}{f.name} = {value!r}  # {doc}; each entry:")
            lines += ["  " + line for line in describe(inner[0], prefix + f.name + "[].")]
        elif dataclasses.is_dataclass(value):
            lines.append(f"{prefix}{f.name}:  # {doc}")
            lines += describe(type(value), prefix + f.name + ".")
        else:
            choices = f.metadata.get("choices")
            extra = f" (one of {list(choices)})" if choices else ""
            lines.append(f"  {prefix}{f.name} = {value!r}  # {doc}{extra}")
    return lines
