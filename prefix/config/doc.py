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
    docs = field_docs()
    lines = ["# The resolved configuration (defaults, the config file, then the overrides); loads back with --config."]
    for section, cls in config.SECTIONS.items():
        lines.append(f"{section}:")
        values = getattr(cfg, section)
        for field in dataclasses.fields(cls):
            value = getattr(values, field.name)
            plain = ([dataclasses.asdict(v) for v in value] if field.name == "streams"
                     else dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
            doc = docs.get((cls.__name__, field.name))
            lines.append(f"  {_key(field.name)}: {_value(plain)}" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines) + "\n"
