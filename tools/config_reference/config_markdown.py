"""The configuration reference's sections as Markdown: the root config, each config group with its options, and
the experiments; with the Markdown helpers (escaping, code spans, tables, GitHub heading anchors)."""

from __future__ import annotations

import inspect
import re
from typing import Any

from config_targets import TargetParams, target_params
from config_tree import (
    EXPERIMENT_GROUP,
    ROOT_CONFIG,
    Tree,
    composed_value,
    defaults_entries,
    dict_get,
    flat_rows,
    merged_data,
    missing_overridden,
    package_of,
    plugin_config,
    root_choices,
    target_nodes,
)
from config_yaml import YamlFile, fmt_value


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
                       if any(n == group.rsplit("/", 1)[1] for n, _, _ in defaults_entries(f)))
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
        for entry, option, _ in defaults_entries(f):
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
        for key in sorted(missing_overridden(f.data, merged)):
            dotted = ".".join(filter(None, [prefix, key]))
            out += [(f"Note: `{dotted}: ???` here does not clear the inherited value (merging `???` onto a "
                     f"value keeps the value), so a run that does not set `{dotted}` reads "
                     f"{code(fmt_value(dict_get(merged, key)))}."), ""]
        unset = unset_args(merged, prefix, cache)
        if unset in seen_unset.values() and unset[0]:
            same = next(o for o, u in seen_unset.items() if u == unset)
            out += [f"{UNSET_TITLE}: the same as for `{group}={same}`.", ""]
        else:
            out += unset_args_md(*unset)
            seen_unset[name] = unset
    return out


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
            target = composed_value(cfg, "model.text_encoder._target_")
            te = f"inline: {target.rsplit('.', 1)[-1]}" if isinstance(target, str) else "—"
        rows.append([f"[{code(name)}](#{anchor(f'experiment={name}')})", code(name.split("/")[0]),
                     code(choices.get("model") or "null"), code(te), code(choices.get("data") or "null"),
                     code(fmt_value(composed_value(cfg, "data.train_manifest"))), code(fmt_value(composed_value(cfg, "data.resolution"))),
                     code(choices.get("trainer") or "null"), code(f"runs/{composed_value(cfg, 'name')}")])
    out += table(["experiment", "system", "model", "text encoder", "data", "data.train_manifest", "resolution",
                  "trainer", "run folder"], rows)
    for name in sorted(tree.experiments):
        f = tree.experiments[name]
        out += [f"### experiment={name}", "", f"`configs/{f.rel}`", ""]
        out += description_md(f.description)
        out += defaults_md(f)
        for entry, option, _ in defaults_entries(f):
            if option is None and entry.startswith(f"/{EXPERIMENT_GROUP}/"):
                base = entry.removeprefix(f"/{EXPERIMENT_GROUP}/")
                link = f"[`experiment={base}`](#{anchor(f'experiment={base}')})"
                out += [f"Includes {link}: its keys apply unless set here.", ""]
        group = f"{EXPERIMENT_GROUP}/{name.rsplit('/', 1)[0]}"
        prefix = "" if f.package == "_global_" else package_of(f, group)
        out += ["Keys it sets:", ""] + keys_table(flat_rows(f, prefix))
    return out
