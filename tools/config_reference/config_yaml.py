"""One YAML file of the config tree, read for the configuration reference: its values (OmegaConf's YAML loader,
so 1e-4 is a float as Hydra reads it) and, from the text, each key's comments, its value as written, the file's
leading comment block and `# @package` directive; and values formatted back as YAML flow style."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf._utils import get_yaml_loader

_KEY_RE = re.compile(r"""^(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^\s:#'"{}\[\],][^:#]*?))"""
                     r"""\s*:(?:\s+|$)(?P<rest>.*)$""")


@dataclass
class YamlFile:
    path: Path                     # absolute
    rel: str                       # relative to the config dir, e.g. "data/shapes.yaml"
    package: str | None            # the `# @package` directive, if any
    description: list[str]         # the leading comment block (without the @package line), "# " stripped
    data: dict                     # the loaded mapping
    comments: dict[tuple, str] = field(default_factory=dict)   # key path -> comment text
    raw: dict[tuple, str] = field(default_factory=dict)        # key path -> value as written (one line)

    @property
    def defaults(self) -> list:
        return list(self.data.get("defaults") or [])


def split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment): a ``#`` starts a comment at the start of the text or after
    whitespace, outside quotes."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'" and (i == 0 or text[i - 1] in " \t[{,:"):
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), ""


def parse_yaml_text(text: str) -> tuple[str | None, list[str], dict[tuple, str], dict[tuple, str]]:
    """Line-based: (package, description lines, comments by key path, raw values by key path).

    A key's comment is the comment after its value on the same line, preceded by the comment lines directly
    above it (same indentation, no blank line between). The file's leading comment block is its description,
    not a key's comment. Sequence items (``- ...``) are not descended into."""
    package, description = None, []
    comments: dict[tuple, str] = {}
    raw: dict[tuple, str] = {}
    stack: list[tuple[int, str]] = []    # (indent, key) of the open mappings
    pending: list[tuple[int, str]] = []  # comment lines directly above the next key
    in_header = True
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if not stripped:
            in_header = False
            pending = []
            continue
        if stripped.startswith("#"):
            body = stripped[1:]
            body = body.removeprefix(" ")
            if in_header:
                if body.startswith("@package"):
                    package = body.split(None, 1)[1].strip() if len(body.split()) > 1 else None
                else:
                    description.append(body.rstrip())
            else:
                pending.append((indent, body.strip()))
            continue
        in_header = False
        if stripped.startswith("-"):
            pending = []
            continue
        m = _KEY_RE.match(stripped)
        if not m:
            pending = []
            continue
        key = next(g for g in (m.group("dq"), m.group("sq"), m.group("bare")) if g is not None)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = tuple(k for _, k in stack) + (key,)
        value, inline = split_comment(m.group("rest"))
        parts = [c for i, c in pending if i == indent and c] + ([inline] if inline else [])
        if parts:
            comments[path] = " ".join(parts)
        if value:
            raw[path] = value
        else:
            stack.append((indent, key))
        pending = []
    while description and not description[-1].strip():
        description.pop()
    return package, description, comments, raw


def load_yaml(path: Path, root: Path) -> YamlFile:
    text = path.read_text()
    package, description, comments, raw = parse_yaml_text(text)
    data = yaml.load(text, Loader=get_yaml_loader()) or {}
    return YamlFile(path=path, rel=path.relative_to(root).as_posix(), package=package, description=description,
                    data=data, comments=comments, raw=raw)


# ------------------------------------------------------------------------------------------------------------
# Formatting values (YAML flow style, as one would write them in a config or an override)
# ------------------------------------------------------------------------------------------------------------

_NEEDS_QUOTES = set("[]{},:#&*!|>%@`\"'?")


def fmt_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _fmt_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{fmt_value(k)}: {fmt_value(v)}" for k, v in value.items()) + "}"
    text = repr(value)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)  # no addresses: the output must be deterministic


def _fmt_str(s: str) -> str:
    """A string as a YAML scalar: bare unless YAML would read it as something else."""
    if (not s or s != s.strip() or (s[0] in _NEEDS_QUOTES and not s.startswith("${"))
            or any(t in s for t in (", ", ": ", " #"))):
        return json.dumps(s)
    try:
        loaded = yaml.load(s, Loader=get_yaml_loader())
    except yaml.YAMLError:
        return json.dumps(s)
    return s if loaded == s else json.dumps(s)


def display_value(f: YamlFile, path: tuple, value: Any) -> str:
    text = f.raw.get(path)
    if text and text[0] not in "|>&*!":
        return text
    return fmt_value(value)
