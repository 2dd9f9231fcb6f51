"""How a setting is declared and checked: `setting()` (a config field with its help, flag and rule), the `Checked`
base that validates every field when a config is built, and conversions to and from plain dicts. The settings
themselves, with their defaults, live in `config.py`."""

from __future__ import annotations

import copy
import dataclasses
import math
import reprlib
from dataclasses import field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from cxr_fast.errors import CxrFastError


class ConfigError(CxrFastError):
    """A setting of the wrong type or out of its range; the message names the field, `flag` its option (if any)."""

    flag: str | None = None


def setting(default: Any, help: str = "", *, flag: str | None = None, choices: tuple | None = None, **bounds: float):
    """A config field with its help text and rule: choices, or a range (bounds ge/gt below, le/lt above)."""
    unknown = set(bounds) - {"ge", "gt", "le", "lt"}
    if unknown:
        raise TypeError(f"setting() bounds are ge, gt, le, lt; got {', '.join(sorted(unknown))}")
    rule = {"help": help, "flag": flag, "choices": choices, "ge": None, "gt": None, "le": None, "lt": None} | bounds
    if isinstance(default, (list, dict)) or is_dataclass(default):  # a copy per instance: nothing shared
        return field(default_factory=lambda: copy.deepcopy(default), metadata=rule)
    return field(default=default, metadata=rule)


# The annotations `_coerce` checks (each also with " | None"); a nested config is a field whose default is a config.
KINDS = ("float", "int", "bool", "str", "int | str", "tuple[float, float]")


_SHOWN = reprlib.Repr()
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlist, _SHOWN.maxdict = 80, 80, 4, 4


def shown(value: Any) -> str:
    """A value as an error message shows it: cut short without rendering it whole (a bad value may be huge)."""
    return _SHOWN.repr(value)


def check_annotations(cls: type) -> None:
    """Refuse a config class with a field of a type the settings do not check (a `Path`, an `Optional[int]`): it
    would pass unchecked and the option builder would not know it. Run for every config class at import."""
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in fields(cls)}
    for f in fields(cls):
        kind = str(f.type).removesuffix(" | None")
        if kind not in KINDS and not is_dataclass(defaults[f.name]):
            raise TypeError(f"{cls.__name__}.{f.name}: annotation {f.type!r} is not one of {', '.join(KINDS)} "
                            "(optionally | None) nor a nested config")


def _coerce(name: str, kind: str, value: Any) -> Any:
    """`value` as the field's type (from its annotation text), or a ConfigError."""
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must be set (a {base})")
    if base == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {shown(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {shown(value)}")
        return float(value)
    if base == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be a whole number, got {shown(value)}")
        return value
    if base == "bool":
        if optional and value == "auto":  # an optional switch: None is auto
            return None
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {shown(value)}")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {shown(value)}")
        return value
    if base == "int | str":  # a count or "auto"
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if base == "tuple[float, float]":
        pair = list(value) if isinstance(value, (list, tuple)) else None
        if pair is None or len(pair) != 2:
            raise ConfigError(f"{name} must be a pair [low, high], got {shown(value)}")
        low, high = (_coerce(name, "float", v) for v in pair)
        if low > high:
            raise ConfigError(f"{name} must be [low, high] with low <= high, got {shown(value)}")
        return low, high
    return value  # a nested config: checked by its own class


def _check_rule(name: str, value: Any, rule: dict) -> None:
    if value is None:
        return
    if rule["choices"] is not None and value not in rule["choices"]:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, rule['choices']))}, got {shown(value)}")
    tests = {"ge": (">=", lambda a, b: a >= b), "gt": (">", lambda a, b: a > b), "le": ("<=", lambda a, b: a <= b),
             "lt": ("<", lambda a, b: a < b)}
    for key, (text, passes) in tests.items():
        bound = rule[key]
        if bound is not None and not all(passes(item, bound) for item in (value if isinstance(value, tuple)
                                                                           else (value,))):
            raise ConfigError(f"{name} must be {text} {bound}, got {shown(value)}")


class Checked:
    """Checks and normalises every field when the config is built (frozen: fields are set via object.__setattr__).

    SECTION names the class in messages; RENAMED maps a key of an older version to (new key, conversion)."""

    SECTION: ClassVar[str] = ""
    RENAMED: ClassVar[dict] = {}

    def __post_init__(self):
        for f in fields(self):
            name = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
            if f.metadata.get("flag"):
                name += f" ({f.metadata['flag']})"
            try:
                value = _coerce(name, str(f.type), getattr(self, f.name))
                if f.metadata:
                    _check_rule(name, value, f.metadata)
            except ConfigError as error:
                error.flag = f.metadata.get("flag")
                raise
            object.__setattr__(self, f.name, value)


def describe(cls: type | Any, path: str) -> tuple[Any, dataclasses.Field]:
    """(default, field) of a dotted path below `cls` (or below a config instance: a nested config's default may
    differ from its class's), e.g. describe(RunConfig, "optim.lr")."""
    head, _, rest = path.partition(".")
    config = cls() if isinstance(cls, type) else cls
    found = {f.name: f for f in fields(config)}[head]
    default = getattr(config, head)
    return describe(default, rest) if rest else (default, found)


def to_dict(config: Any) -> dict:
    """A plain nested dict (tuples as lists), for YAML and checkpoints."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def from_dict(cls: type | Any, values: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a nested dict; missing fields keep their defaults (a nested config's own default,
    which may differ from its class's), unknown keys are an error. `cls` may be an instance to start from."""
    base = cls() if isinstance(cls, type) else cls
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    for old, (new, convert) in getattr(base, "RENAMED", {}).items():
        if old in values and new not in values:
            values = {k: v for k, v in values.items() if k != old} | {new: convert(values[old])}
    known = {f.name: f for f in fields(base)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(base, name)
        kwargs[name] = from_dict(default, value, f"{where}.{name}") if is_dataclass(default) else value
    return dataclasses.replace(base, **kwargs)


def replace(config: Any, **changes: Any) -> Any:
    """`dataclasses.replace` that accepts dotted paths: replace(config, **{"optim.lr": 1e-3})."""
    nested: dict[str, dict] = {}
    direct = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[key] = value
    for head, sub in nested.items():
        direct[head] = replace(getattr(config, head), **sub)
    return dataclasses.replace(config, **direct)


MAX_YAML_BYTES = 1_000_000  # a config, spec or relabel file is a page of settings; anything larger is not one


def load_plain_yaml(path: str | Path, what: str):
    """The value of a small YAML file read with the safe loader, refusing what can make a few bytes expand without
    bound (anchors and aliases: a 400-byte "billion laughs" file becomes gigabytes) and files over MAX_YAML_BYTES
    or not regular; errors name the file and `what` it is, cut short."""
    path = Path(path)
    try:
        if not path.resolve().is_file():
            raise ConfigError(f"{what} {path} is not a regular file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_YAML_BYTES + 1)
        if len(data) > MAX_YAML_BYTES:
            raise ConfigError(f"{what} {path} is over {MAX_YAML_BYTES:,} bytes: not a settings file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{what} {path} is not UTF-8 text (a YAML file is)") from None
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
                raise ConfigError(f"{what} {path}: YAML anchors and aliases (&, *) are not accepted; write values out")
        return yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {what} {path}: {str(error)[:300]}") from None


def read_yaml(path: str | Path, cls: type):
    """`cls` from a YAML file of any subset of its fields; an unreadable file or a bad value names the file."""
    values = load_plain_yaml(path, "config") or {}
    try:
        return from_dict(cls, values, where=str(path))
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def dump_yaml(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
