"""`prefix train --print-config`: the resolved config as YAML, every key with its one-line doc.

The docs are the attribute docstrings under each field in config/sections.py, read from its source, so the
printed file and the code can never disagree. The output loads back as a config file.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from functools import cache
from typing import Any

import yaml

from prefix import config
from prefix.config import sections

SENTENCE = re.compile(r"(?<!e\.g)(?<!i\.e)\. ")
"""The end of a sentence, not of an abbreviation."""


@cache
def field_docs() -> dict[tuple[str, str], str]:
    """(class name, field) → the first sentence of the string literal that follows the field."""
    docs: dict[tuple[str, str], str] = {}
    for cls in ast.parse(inspect.getsource(sections)).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for field, doc in zip(cls.body, cls.body[1:], strict=False):
            if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                    and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)):
                text = " ".join(doc.value.value.split())
                docs[(cls.name, field.target.id)] = SENTENCE.split(text)[0].rstrip(".")
    return docs


def _key(name: str) -> str:
    return {field: key for key, field in config.KEYWORD_KEYS.items()}.get(name, name)


def _value(value: Any) -> str:
    """One YAML scalar or flow collection, as it would appear after `key: `."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("\n...")


def describe(cfg: config.Config) -> str:
    lines = ["# The resolved configuration (defaults, the config file, then the overrides); loads back with --config."]
    for section in config.SECTIONS:
        lines.append(f"{section}:")
        _fields(lines, getattr(cfg, section), "  ")
    return "\n".join(lines) + "\n"


def _fields(lines: list[str], values: Any, indent: str) -> None:
    """One line per field with its doc; a section within the section (telemetry.wandb) as a block."""
    docs = field_docs()
    for field in dataclasses.fields(values):
        value = getattr(values, field.name)
        doc = docs.get((type(values).__name__, field.name))
        if dataclasses.is_dataclass(value) and field.name != "rope_scaling":
            lines.append(f"{indent}{_key(field.name)}:")
            _fields(lines, value, indent + "  ")
            continue
        plain = ([dataclasses.asdict(v) for v in value] if field.name == "streams"
                 else dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
        lines.append(f"{indent}{_key(field.name)}: {_value(plain)}" + (f"  # {doc}" if doc else ""))
