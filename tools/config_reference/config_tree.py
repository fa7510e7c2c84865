"""The Hydra config tree as the configuration reference reads it: the root config, every option of every config
group and every experiment, walked into keys, defaults lists, `_target_` mappings and merged group options;
experiments composed with Hydra as the command line does."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config_yaml import YamlFile, display_value, load_yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from t2i.cli.config import config_dir

ROOT_CONFIG = "train.yaml"
EXPERIMENT_GROUP = "experiment"


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


def defaults_entries(f: YamlFile) -> Iterator[tuple[str, str | None, bool]]:
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
    return {g: o for g, o, _ in defaults_entries(tree.train) if o is not None or g in tree.groups
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
    """A group option's mapping with what its defaults list brings merged under it, so that those keys count as
    set: same-group options it inherits (data/webdataset over data/shapes) and subgroup options (a model's
    ``optimizer: adamw`` at ``model.optimizer``, ``optimizer@disc_optimizer`` at ``model.disc_optimizer``, a
    ``# @package model`` option at the model's own keys)."""
    base = OmegaConf.create({})
    prefix = package_of(f, group)
    for name, option, _ in defaults_entries(f):
        if option is None and name in tree.groups.get(group, {}):
            base = OmegaConf.merge(base, merged_data(tree, group, tree.groups[group][name]))
            continue
        sub, _, rename = name.lstrip("/").partition("@")
        subgroup = sub if sub.startswith(group + "/") else f"{group}/{sub}"
        sub_f = tree.groups.get(subgroup, {}).get(option) if isinstance(option, str) else None
        if sub_f is None:
            continue
        package = package_of(sub_f, subgroup)
        if rename:
            package = ".".join([*package.split(".")[:-1], rename])
        if package != prefix and not package.startswith(prefix + "."):
            continue  # lands outside this option's keys
        node = merged_data(tree, subgroup, sub_f)
        relative = package[len(prefix):].lstrip(".")
        for key in reversed(relative.split(".") if relative else []):
            node = {key: node}
        base = OmegaConf.merge(base, OmegaConf.create(node))
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


def dict_get(data: dict, dotted: str) -> Any:
    """The value at a dotted key of nested mappings, or None."""
    for k in dotted.split("."):
        data = data.get(k) if isinstance(data, dict) else None
    return data


def missing_overridden(own: dict, merged: dict, path: tuple = ()) -> Iterator[str]:
    """Keys a file sets to `???` whose merged value is not missing (a `???` never overrides a value)."""
    for k, v in own.items():
        if not path and k == "defaults":
            continue
        m = merged.get(k) if isinstance(merged, dict) else None
        if isinstance(v, dict):
            yield from missing_overridden(v, m if isinstance(m, dict) else {}, path + (str(k),))
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


def composed_value(cfg: Any, dotted: str) -> Any:
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
