"""``key=value`` command-line options into a dataclass (the small CLIs: generate, evaluate): typed by the field
annotations (int, float, bool, str, ``X | None``), an unknown key or a bad value is a clear exit."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

T = TypeVar("T")


def parse_key_values(cls: type[T], argv: list[str]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"expected key=value, got {arg!r} (see --help)")
        key, value = arg.split("=", 1)
        if key not in fields:
            raise SystemExit(f"unknown option {key!r}; options: {', '.join(fields)}")
        kind = str(fields[key].type)
        try:
            if value.lower() in ("none", "null", "") and "None" in kind:
                values[key] = None
            elif kind.startswith("int"):
                values[key] = int(value)
            elif kind.startswith("float"):
                values[key] = float(value)
            elif kind.startswith("bool"):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                values[key] = value.lower() in ("true", "1")
            else:
                values[key] = value
        except ValueError as e:
            raise SystemExit(f"{key}={value!r}: {e}") from None
    return cls(**values)
