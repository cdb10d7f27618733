"""From YAML and `section.key=value` overrides to a validated Config: strict YAML (a key given twice is
refused, a syntax error keeps the parser's words), typed coercion, unknown keys with a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from prefix.config.checks import ConfigError, validate
from prefix.config.sections import SECTIONS, Config


def _did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert `value` to the annotated type, or raise ConfigError naming the key."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        *first, hint = [a for a in args if a is not type(None)]
        for option in first:  # `float | str`: a number if it is one
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(hint) is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return _fill(hint(), value, key)
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {name}, got {value!r}; set it to a valid {name}")


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, rejecting unknown sections and keys."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the file must hold a mapping of sections (" + ", ".join(SECTIONS) + ")")
    cfg = Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section{_did_you_mean(section, SECTIONS)}; "
                              f"valid sections are {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        _fill(getattr(cfg, section), values, section)
    validate(cfg)
    return cfg


KEYWORD_KEYS = {"async": "asynchronous"}
"""Config keys that are Python keywords, and the fields that hold them."""


def _fill(target: Any, values: dict[str, Any], where: str) -> Any:
    """Set the dataclass `target`'s fields from `values`, rejecting unknown keys."""
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        key = KEYWORD_KEYS.get(key, key)
        if key not in hints:
            raise ConfigError(f"{where}.{key}: unknown key{_did_you_mean(key, hints)}; "
                              f"valid keys are {', '.join(hints)}")
        setattr(target, key, _coerce(f"{where}.{key}", value, hints[key]))
    return target


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` → (section, key, value parsed as YAML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"{text}: overrides look like section.key=value, e.g. trainer.max_steps=100")
    dotted, value = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return section, key, parsed


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"{self.name}: line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                                  f"(first at line {seen[key]}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A config file's data; a syntax error keeps the parser's own words and position."""
    text = path.read_text()
    try:
        loader = _StrictLoader(text)
        loader.name = str(path)
        try:
            return loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None)))) or str(e)
        raise ConfigError(f"{path}: not valid YAML{where} ({problem}); fix the syntax there") from None


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from defaults) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; pass an existing YAML file to --config")
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the file must hold a mapping of sections (run, data, model, ...)")
    for text in overrides:
        section, key, value = parse_override(text)
        *parents, key = [section, *key.split(".")]  # telemetry.wandb.project: a section within a section
        values = raw
        for depth, name in enumerate(parents):
            values = values.setdefault(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{'.'.join(parents[:depth + 1])}: expected a mapping of keys in the config file")
        values[key] = value
    return from_dict(raw)
