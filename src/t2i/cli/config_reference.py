"""Write the configuration reference (docs/configuration.md) from the Hydra config tree.

    python -m t2i.cli.config_reference                 # (re)write docs/configuration.md
    python -m t2i.cli.config_reference --out ref.md    # elsewhere ("-": stdout)
    python -m t2i.cli.config_reference --check         # exit 1 when docs/configuration.md is stale (CI)

The reference lists the root config's keys, every option of every config group and every experiment, each
key with the value written in its YAML file and the comment written next to it (or on the lines directly
above it), and for every ``_target_`` the constructor arguments that the YAML leaves at their Python defaults
(read from the signature; nothing is instantiated). Experiments are composed with Hydra (as the command line
does) for the table of what each one uses. The output is deterministic: no timestamps, groups in the root
defaults-list order, options and experiments sorted by name.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.utils import _locate
from omegaconf import OmegaConf
from omegaconf._utils import get_yaml_loader

from t2i.cli.config import config_dir

ROOT_CONFIG = "train.yaml"
EXPERIMENT_GROUP = "experiment"
GENERATOR = "python -m t2i.cli.config_reference"

# ------------------------------------------------------------------------------------------------------------
# Reading one YAML file: values (OmegaConf's YAML loader, so 1e-4 is a float as Hydra reads it) and, from the
# text, each key's comments, its value as written, and the file's leading comment block.
# ------------------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------------------
# Constructor signatures of `_target_`s (nothing is instantiated)
# ------------------------------------------------------------------------------------------------------------

@dataclass
class TargetParams:
    target: str
    params: list[tuple[str, Any]]   # (name, default or inspect.Parameter.empty), in signature order
    open_kwargs: bool               # accepts further **kwargs that are not resolved to named parameters
    error: str | None = None


def _super_init_call(cls: type) -> tuple[int, set[str], bool] | None:
    """(positional args, keyword names, passes **kwargs) of the ``super().__init__(...)`` call in
    ``cls.__init__``'s source, or None when there is none or no source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"
                and isinstance(node.func.value, ast.Call) and isinstance(node.func.value.func, ast.Name)
                and node.func.value.func.id == "super"):
            npos = sum(1 for a in node.args if not isinstance(a, ast.Starred))
            names = {k.arg for k in node.keywords if k.arg is not None}
            return npos, names, any(k.arg is None for k in node.keywords)
    return None


def target_params(target: str) -> TargetParams:
    """The named parameters of a `_target_` (a class, function or classmethod). For a class whose
    ``__init__`` takes ``**kwargs`` and hands them to ``super().__init__``, the base class's parameters that
    the call does not set follow (repeatedly up the MRO)."""
    try:
        obj = _locate(target)
        sig = inspect.signature(obj)
    except Exception as e:  # noqa: BLE001 - reported in the output instead
        return TargetParams(target, [], False, f"{type(e).__name__}: {e}")
    params: list[tuple[str, Any]] = []
    seen: set[str] = set()

    def add(parameters, skip_positional: int = 0, skip_names: frozenset = frozenset()) -> bool:
        var_kw = False
        for p in parameters:
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
                continue
            if p.kind is p.VAR_POSITIONAL:
                continue
            if skip_positional and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                skip_positional -= 1
                continue
            if p.name in seen or p.name in skip_names:
                continue
            seen.add(p.name)
            params.append((p.name, p.default))
        return var_kw

    open_kwargs = add(sig.parameters.values())
    if inspect.isclass(obj):
        owner = next((c for c in obj.__mro__ if "__init__" in c.__dict__), None)
        while open_kwargs and owner is not None:
            call = _super_init_call(owner)
            if call is None or not call[2]:
                break  # **kwargs go elsewhere (or we cannot tell): stay open
            npos, names, _ = call
            mro = obj.__mro__
            base = next((c for c in mro[mro.index(owner) + 1:] if "__init__" in c.__dict__), None)
            if base is None or base is object:
                break
            base_params = list(inspect.signature(base.__init__).parameters.values())[1:]  # drop self
            open_kwargs = add(base_params, npos, frozenset(names))
            owner = base
    return TargetParams(target, params, open_kwargs)


# ------------------------------------------------------------------------------------------------------------
# The config tree
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Tree:
    root: Path
    train: YamlFile
    groups: dict[str, dict[str, YamlFile]]        # group -> option -> file (experiments excluded)
    experiments: dict[str, YamlFile]               # "tiny/vae" -> file


def read_tree(root: Path | None = None) -> Tree:
    root = Path(root) if root is not None else config_dir()
    groups: dict[str, dict[str, YamlFile]] = {}
    experiments: dict[str, YamlFile] = {}
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root)
        if rel.as_posix() == ROOT_CONFIG:
            continue
        group = rel.parent.as_posix()
        if group == ".":
            continue  # another primary config: not part of the training tree
        f = load_yaml(path, root)
        if group == EXPERIMENT_GROUP or group.startswith(EXPERIMENT_GROUP + "/"):
            experiments[rel.relative_to(EXPERIMENT_GROUP).with_suffix("").as_posix()] = f
        else:
            groups.setdefault(group, {})[rel.stem] = f
    return Tree(root, load_yaml(root / ROOT_CONFIG, root), groups, experiments)


def _defaults_entries(f: YamlFile) -> Iterator[tuple[str, str | None, bool]]:
    """(group or config name, option or None, is override) of a defaults list, `_self_` left out."""
    for entry in f.defaults:
        if isinstance(entry, str):
            if entry != "_self_":
                yield entry, None, False
        elif isinstance(entry, dict):
            for k, v in entry.items():
                override = k.startswith("override ")
                yield (k.split(None, 1)[1] if override else k), v, override


def root_choices(tree: Tree) -> dict[str, str | None]:
    return {g: o for g, o, _ in _defaults_entries(tree.train) if o is not None or g in tree.groups
            or g == EXPERIMENT_GROUP}


def group_order(tree: Tree) -> list[str]:
    """Groups in the root defaults-list order, each followed by its subgroups; then the rest, sorted."""
    order: list[str] = []
    for g in list(root_choices(tree)) + sorted(tree.groups):
        for name in [g] + sorted(s for s in tree.groups if s.startswith(g + "/")):
            if name in tree.groups and name not in order:
                order.append(name)
    return order


def package_of(f: YamlFile, group: str) -> str:
    """The dotted prefix of a group option's keys (Hydra 1.3: `_group_` unless `# @package` says otherwise)."""
    pkg = f.package or "_group_"
    if pkg == "_global_":
        return ""
    return pkg.replace("_group_", group.replace("/", "."))


def flat_rows(f: YamlFile, prefix: str) -> list[tuple[str, str, str]]:
    """(dotted key, value as written, comment) for every leaf of a file, in file order; a mapping header
    appears too when a comment is written next to it. Flow mappings ({a: 1}) are one value."""
    rows: list[tuple[str, str, str]] = []

    def walk(node: dict, path: tuple) -> None:
        for key, value in node.items():
            if not path and key == "defaults":
                continue
            p = path + (str(key),)
            dotted = ".".join(((prefix,) if prefix else ()) + p)
            comment = f.comments.get(p, "")
            is_flow = f.raw.get(p, "").startswith("{")
            if isinstance(value, dict) and value and not is_flow:
                if comment:
                    rows.append((dotted, "", comment))
                walk(value, p)
            else:
                rows.append((dotted, display_value(f, p, value), comment))

    walk(f.data, ())
    return rows


def target_nodes(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """(path, mapping) of every mapping with a `_target_`, outermost first, in file order."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for k, v in node.items():
            if k != "defaults":
                yield from target_nodes(v, path + (str(k),))


def merged_data(tree: Tree, group: str, f: YamlFile) -> dict:
    """A group option's mapping with the same-group options of its defaults list merged under it (e.g.
    data/webdataset over data/shapes), so that inherited keys count as set."""
    base = OmegaConf.create({})
    for name, option, _ in _defaults_entries(f):
        if option is None and name in tree.groups.get(group, {}):
            base = OmegaConf.merge(base, merged_data(tree, group, tree.groups[group][name]))
    own = {k: v for k, v in f.data.items() if k != "defaults"}
    return OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.create(own)), resolve=False)


def plugin_config(group: str, option: str) -> dict | None:
    """A config that a Hydra plugin registers in the ConfigStore (e.g. hydra/launcher/submitit_slurm)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports the installed hydra_plugins, which register their configs
    try:
        node = ConfigStore.instance().load(f"{group}/{option}.yaml")
    except Exception:  # noqa: BLE001 - not registered: the caller says so
        return None
    return OmegaConf.to_container(node.node, resolve=False)


# ------------------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------------------

def esc(text: str) -> str:
    """Text for a paragraph or a table cell: no HTML tags outside code spans, no column breaks."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # unbalanced backticks: no code spans
        parts = [text]
    out = [p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts)]
    return "`".join(out).replace("|", "\\|")


def code(text: str) -> str:
    if not text:
        return ""
    text = text.replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def description_md(lines: list[str]) -> list[str]:
    """A leading comment block as Markdown: prose lines joined into paragraphs, indented lines (commands,
    measurements) as a code block."""
    out: list[str] = []
    prose: list[str] = []
    block: list[str] = []

    def flush_prose() -> None:
        if prose:
            out.extend([esc(" ".join(s.strip() for s in prose)), ""])
            prose.clear()

    def flush_block() -> None:
        if block:
            width = min(len(s) - len(s.lstrip()) for s in block)
            out.extend(["```text", *[s[width:] for s in block], "```", ""])
            block.clear()

    for line in lines:
        if not line.strip():
            flush_prose()
            flush_block()
        elif line.startswith("  "):
            flush_prose()
            block.append(line.rstrip())
        else:
            flush_block()
            prose.append(line)
    flush_prose()
    flush_block()
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def anchor(title: str) -> str:
    """GitHub's heading anchor."""
    a = title.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")


def keys_table(rows: list[tuple[str, str, str]]) -> list[str]:
    if not rows:
        return ["(no keys)", ""]
    return table(["key", "value", "comment"], [[code(k), code(v), esc(c)] for k, v, c in rows])


def unset_args(data: dict, prefix: str, cache: dict[str, TargetParams]) -> tuple[list[list[str]], list[str]]:
    """For each `_target_` of a mapping: (table rows of its constructor arguments the mapping does not set, with
    their Python defaults; notes). The key is what `+key=value` would set on the command line."""
    rows: list[list[str]] = []
    notes: list[str] = []
    for path, node in target_nodes(data):
        target = node["_target_"]
        if not isinstance(target, str):
            continue
        tp = cache.setdefault(target, target_params(target))
        key_prefix = ".".join(((prefix,) if prefix else ()) + path)
        parts = target.rsplit(".", 2)
        short = ".".join(parts[-2:]) if len(parts) > 1 and parts[-2][:1].isupper() else parts[-1]
        if tp.error:
            notes.append(f"- {code(target)} could not be imported here ({esc(tp.error)}): its arguments are not "
                         "listed.")
            continue
        partial = bool(node.get("_partial_"))
        for name, default in tp.params:
            if name in node:
                continue
            if default is inspect.Parameter.empty:
                value = "(given when called)" if partial else "(required; given by the code)"
            else:
                value = code(fmt_value(default))
            rows.append([code(f"{key_prefix}.{name}" if key_prefix else name), value, code(short)])
        if tp.open_kwargs:
            notes.append(f"- {code(short)} also takes further keyword arguments (`**kwargs`), passed on.")
    return rows, notes


UNSET_TITLE = "Constructor arguments not set here (their Python defaults apply; set one with `+key=value`)"


def unset_args_md(rows: list[list[str]], notes: list[str]) -> list[str]:
    if not rows and not notes:
        return []
    out = [UNSET_TITLE + ":", ""]
    if rows:
        out += table(["key", "default", "of"], rows)
    return out + (notes + [""] if notes else [])


def defaults_md(f: YamlFile) -> list[str]:
    entries = [e for e in f.defaults if e != "_self_"]
    if not entries:
        return []
    items = []
    for e in entries:
        if isinstance(e, dict):
            items.extend(code(f"{k}: {fmt_value(v)}") for k, v in e.items())
        else:
            items.append(code(str(e)))
    return ["Defaults list: " + ", ".join(items) + ".", ""]


def render_root(tree: Tree, cache: dict[str, TargetParams]) -> list[str]:
    f = tree.train
    out = [f"## Root config (`configs/{ROOT_CONFIG}`)", ""]
    out += description_md(f.description)
    rows = []
    for group, option in root_choices(tree).items():
        opts = sorted(tree.groups.get(group, {}))
        if group == EXPERIMENT_GROUP:
            opts = sorted(tree.experiments)
            where = "[experiments](#experiments)"
        else:
            where = f"[{group}](#{anchor(f'{group}')})"
        shown = ", ".join(code(o) for o in opts) if len(opts) <= 8 else f"{len(opts)} options"
        rows.append([code(group), code(fmt_value(option)), shown, where])
    out += ["The defaults list: each group's default option (`null`: none unless chosen).", ""]
    out += table(["group", "default", "options", "see"], rows)
    out += ["Keys:", ""]
    out += keys_table(flat_rows(f, ""))
    return out


def render_group(tree: Tree, group: str, cache: dict[str, TargetParams]) -> list[str]:
    options = tree.groups[group]
    default = root_choices(tree).get(group)
    parent = group.rsplit("/", 1)[0] if "/" in group else None
    out = [f"### {group}", ""]
    pick = f"`{group}=<option>`"
    if parent in tree.groups:
        users = sorted(o for o, f in tree.groups[parent].items()
                       if any(n == group.rsplit("/", 1)[1] for n, _, _ in _defaults_entries(f)))
        pick += (f" (or `override /{group}: <option>` in an experiment); the default comes from the "
                 f"{parent} option's defaults list" + (f" ({', '.join(code(u) for u in users)})" if users else ""))
    elif default is not None:
        pick += f" (default: {code(default)})"
    out += [f"Options: {', '.join(code(o) for o in sorted(options))}. Choose with {pick}.", ""]
    seen_unset: dict[str, tuple] = {}
    for name in sorted(options):
        f = options[name]
        prefix = package_of(f, group)
        out += [f"#### {group}={name}", "", f"`configs/{f.rel}`" + (f" (package `{f.package}`)" if f.package else ""), ""]
        out += description_md(f.description)
        out += defaults_md(f)
        plugin_md: list[str] = []
        for entry, option, _ in _defaults_entries(f):
            if option is None and entry in options:
                out += [f"Inherits `{group}={entry}`: its keys apply unless set here.", ""]
            elif option is None:
                plugin = plugin_config(group, entry)
                if plugin is None:
                    out += [f"Inherits `{entry}`, which is not in `configs/` (a Hydra plugin's config?).", ""]
                    continue
                target = plugin.get("_target_", "")
                out += [f"Inherits `{group}={entry}` from an installed Hydra plugin"
                        + (f" (target {code(target)})" if target else "") + ".", ""]
                extra = [(".".join(filter(None, [prefix, k])), fmt_value(v), "")
                         for k, v in plugin.items() if k not in f.data and k != "_target_"]
                if extra:
                    plugin_md += [f"Keys that `{entry}` sets and this file does not:", ""] + keys_table(extra)
        root_target = f.data.get("_target_")
        if isinstance(root_target, str):
            out += [f"Target: {code(root_target)}.", ""]
        out += keys_table(flat_rows(f, prefix))
        out += plugin_md
        merged = merged_data(tree, group, f)
        for key in sorted(_missing_overridden(f.data, merged)):
            dotted = ".".join(filter(None, [prefix, key]))
            out += [(f"Note: `{dotted}: ???` here does not clear the inherited value (merging `???` onto a "
                     f"value keeps the value), so a run that does not set `{dotted}` reads "
                     f"{code(fmt_value(_dict_get(merged, key)))}."), ""]
        unset = unset_args(merged, prefix, cache)
        if unset in seen_unset.values() and unset[0]:
            same = next(o for o, u in seen_unset.items() if u == unset)
            out += [f"{UNSET_TITLE}: the same as for `{group}={same}`.", ""]
        else:
            out += unset_args_md(*unset)
            seen_unset[name] = unset
    return out


def _dict_get(data: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        data = data.get(k) if isinstance(data, dict) else None
    return data


def _missing_overridden(own: dict, merged: dict, path: tuple = ()) -> Iterator[str]:
    """Keys a file sets to `???` whose merged value is not missing (a `???` never overrides a value)."""
    for k, v in own.items():
        if not path and k == "defaults":
            continue
        m = merged.get(k) if isinstance(merged, dict) else None
        if isinstance(v, dict):
            yield from _missing_overridden(v, m if isinstance(m, dict) else {}, path + (str(k),))
        elif v == "???" and m is not None and m != "???":
            yield ".".join(path + (str(k),))


def compose_experiments(tree: Tree) -> dict[str, Any]:
    """Each experiment composed as `python -m t2i.cli.train experiment=...` would (nothing resolved)."""
    out = {}
    with initialize_config_dir(str(tree.root), version_base="1.3"):
        for name in sorted(tree.experiments):
            out[name] = compose(config_name=tree.train.path.stem, overrides=[f"experiment={name}"],
                                return_hydra_config=True)
    return out


def _raw(cfg: Any, dotted: str) -> Any:
    """A composed config's value as written (interpolations unresolved), or None when the key is absent."""
    parent, _, key = dotted.rpartition(".")
    container = OmegaConf.select(cfg, parent) if parent else cfg
    if not OmegaConf.is_dict(container):
        return None
    node = container._get_node(key)
    if node is None:
        return None
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=False)
    return node._value()


def render_experiments(tree: Tree, composed: dict[str, Any]) -> list[str]:
    out = ["## Experiments", "",
           ("Choose one with `experiment=<system>/<name>` (the system is its folder under `configs/experiment/`). "
            "An experiment is a `_global_` config: it picks the group options (`override /model: ...`) and "
            "overrides keys anywhere in the tree. Its `name` is the run folder `${paths.runs}/<name>` "
            "(`runs/<name>` by default). The table is read from each experiment as Hydra composes it."), ""]
    rows = []
    for name in sorted(tree.experiments):
        cfg = composed[name]
        choices = cfg.hydra.runtime.choices
        te = choices.get("model/text_encoder")
        if te is None:
            target = _raw(cfg, "model.text_encoder._target_")
            te = f"inline: {target.rsplit('.', 1)[-1]}" if isinstance(target, str) else "—"
        rows.append([f"[{code(name)}](#{anchor(f'experiment={name}')})", code(name.split("/")[0]),
                     code(choices.get("model") or "null"), code(te), code(choices.get("data") or "null"),
                     code(fmt_value(_raw(cfg, "data.train_manifest"))), code(fmt_value(_raw(cfg, "data.resolution"))),
                     code(choices.get("trainer") or "null"), code(f"runs/{_raw(cfg, 'name')}")])
    out += table(["experiment", "system", "model", "text encoder", "data", "data.train_manifest", "resolution",
                  "trainer", "run folder"], rows)
    for name in sorted(tree.experiments):
        f = tree.experiments[name]
        out += [f"### experiment={name}", "", f"`configs/{f.rel}`", ""]
        out += description_md(f.description)
        out += defaults_md(f)
        for entry, option, _ in _defaults_entries(f):
            if option is None and entry.startswith(f"/{EXPERIMENT_GROUP}/"):
                base = entry.removeprefix(f"/{EXPERIMENT_GROUP}/")
                link = f"[`experiment={base}`](#{anchor(f'experiment={base}')})"
                out += [f"Includes {link}: its keys apply unless set here.", ""]
        group = f"{EXPERIMENT_GROUP}/{name.rsplit('/', 1)[0]}"
        prefix = "" if f.package == "_global_" else package_of(f, group)
        out += ["Keys it sets:", ""] + keys_table(flat_rows(f, prefix))
    return out


def generate(root: Path | None = None) -> str:
    """The whole reference as Markdown."""
    tree = read_tree(root)
    cache: dict[str, TargetParams] = {}
    order = group_order(tree)
    n_files = 1 + sum(len(o) for o in tree.groups.values()) + len(tree.experiments)
    out = ["# Configuration reference", "",
           f"<!-- Generated by `{GENERATOR}` from `configs/`; do not edit. -->", "",
           (f"Generated from the Hydra config tree in `configs/` ({n_files} files) by `{GENERATOR}` "
            "(`make config-docs`); `--check` fails when this page is stale."), "",
           ("Every key is a command-line override of `python -m t2i.cli.train`: "
            "`python -m t2i.cli.train experiment=tiny/vae data.batch_size=32`; a group option is chosen with "
            "`group=option` (`data=webdataset`, `strategy=ddp`). Values are as written in the YAML: `???` must be "
            "given, `${...}` is an interpolation, `null` is None. Comments are the ones written next to (or "
            "directly above) the key. A key that the YAML does not set is not in the config: set a constructor "
            "argument listed under *Constructor arguments not set here* with `+key=value` (their defaults are "
            "read from the installed torch / Lightning / DeepSpeed / open_clip)."), "",
           "- [Root config](#" + anchor(f"Root config (configs/{ROOT_CONFIG})") + ")",
           "- [Config groups](#config-groups): " + ", ".join(f"[{g}](#{anchor(g)})" for g in order),
           "- [Experiments](#experiments)", ""]
    out += render_root(tree, cache)
    out += ["## Config groups", ""]
    for group in order:
        out += render_group(tree, group, cache)
    out += render_experiments(tree, compose_experiments(tree))
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def default_out() -> Path:
    return config_dir().parent / "docs" / "configuration.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=GENERATOR, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="where to write (default: docs/configuration.md; '-': stdout)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 when the file differs from what would be generated")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out and args.out != "-" else default_out()
    text = generate()
    if args.check:
        current = out.read_text() if out.is_file() else None
        if current == text:
            print(f"{out} is up to date")
            return 0
        if current is None:
            print(f"{out} does not exist; write it with `{GENERATOR}`", file=sys.stderr)
            return 1
        diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(), str(out), "generated",
                                         lineterm="", n=1))
        print(f"{out} is out of date with configs/: regenerate it with `{GENERATOR}` (or `make config-docs`) "
              f"and commit it. First differences:", file=sys.stderr)
        print("\n".join(diff[:40]) + ("\n..." if len(diff) > 40 else ""), file=sys.stderr)
        return 1
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} ({len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
