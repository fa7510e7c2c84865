"""Run a recipe: an ordered list of steps (data preparation, training stages, evaluation) where later
steps use earlier stages' exports.

    python -m t2i.cli.recipe recipes/ldm.yaml [STAGE.KEY=VALUE ...] [--only STAGE] [--force STAGE]

A training stage runs as ``python -m t2i.cli.train experiment=...`` in a subprocess (so DDP launches
work as on the command line) with ``ckpt_path=last``: an interrupted stage resumes. A stage whose export
exists and was trained from the same config (hash in stage.json, parents included) is skipped.
``vae.trainer.max_steps=100`` overrides a setting of the stage named ``vae``; ``trainer.devices=4``
(no stage prefix) applies to every training stage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from t2i.cli.config import compose_config
from t2i.exports import STAGE, ExportError, config_hash

STAGE_REF = re.compile(r"\$\{stage:([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_]+))?\}")


class RecipeError(RuntimeError):
    pass


class RecipeRunner:
    def __init__(self, recipe_path: str | Path, overrides: list[str] = (), force: tuple[str, ...] = ()):
        self.path = Path(recipe_path)
        self.recipe = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        self.steps = self.recipe.get("steps") or []
        if not self.steps:
            raise RecipeError(f"{self.path}: no steps")
        names = [s["name"] for s in self.steps]
        if len(set(names)) != len(names):
            raise RecipeError(f"{self.path}: step names must be unique: {names}")
        self.stage_overrides, self.global_overrides = self._split_overrides(list(overrides), names)
        self.force = set(force)
        self.exports: dict[str, dict] = {}  # stage name -> {"export": path, "hash": config hash}

    @staticmethod
    def _split_overrides(overrides: list[str], names: list[str]) -> tuple[dict[str, list[str]], list[str]]:
        per_stage: dict[str, list[str]] = {n: [] for n in names}
        common = []
        for o in overrides:
            head = o.split("=", 1)[0].lstrip("+~").split(".", 1)[0]
            if head in per_stage and "." in o.split("=", 1)[0]:
                prefix = o[: len(o) - len(o.lstrip("+~"))]
                per_stage[head].append(prefix + o.lstrip("+~").split(".", 1)[1])
            else:
                common.append(o)
        return per_stage, common

    def _resolve_value(self, value):
        """``${stage:...}`` references resolved in a string, or in the strings of a (nested) list or dict."""
        if isinstance(value, str):
            return self._resolve(value)
        if isinstance(value, list):
            return [self._resolve_value(v) for v in value]
        if isinstance(value, dict):
            return {k: self._resolve_value(v) for k, v in value.items()}
        return value

    def _resolve(self, text: str) -> str:
        def sub(m: re.Match) -> str:
            name, attr = m.group(1), m.group(2) or "export"
            if name not in self.exports:
                raise RecipeError(f"{self.path}: '{m.group(0)}' refers to stage {name!r}, which has not run "
                                  f"before this step (order the steps so that it does)")
            return str(self.exports[name][attr])
        return STAGE_REF.sub(sub, text)

    def run(self, only: str | None = None) -> dict[str, dict]:
        if only and only not in {s["name"] for s in self.steps}:
            raise RecipeError(f"{self.path}: --only {only!r} names no step; the steps are "
                              f"{[s['name'] for s in self.steps]}")
        for step in self.steps:
            if only and step["name"] != only and step.get("kind") != "train":
                continue
            start = time.time()
            kind = step.get("kind", "train")
            print(f"\n[recipe] ===== {step['name']} ({kind}) =====", flush=True)
            if kind == "train":
                self._train(step, run=(only is None or only == step["name"]))
            elif kind == "command":
                self._command(step)
            elif kind == "call":
                self._call(step)
            else:
                raise RecipeError(f"{self.path}: step {step['name']!r} has unknown kind {kind!r}")
            print(f"[recipe] {step['name']}: {time.time() - start:.0f}s", flush=True)
            if only == step["name"]:
                break  # later steps cannot feed this one: they are neither checked nor run
        return self.exports

    def stage_config(self, step: dict) -> tuple[list[str], dict]:
        parents = {n: self.exports[n]["hash"] for n in step.get("parents", [])}
        own = self.stage_overrides[step["name"]]
        experiment = next((o.split("=", 1)[1] for o in own if o.startswith("experiment=")), step["experiment"])
        overrides = [f"experiment={experiment}", *map(self._resolve, step.get("overrides", [])),
                     *(f"+parents.{n}={h}" for n, h in parents.items()),
                     *self.global_overrides, *(o for o in own if not o.startswith("experiment="))]
        cfg = compose_config(overrides)
        return overrides, OmegaConf.to_container(cfg, resolve=True)

    def _train(self, step: dict, run: bool = True) -> None:
        overrides, cfg = self.stage_config(step)
        digest = config_hash(cfg)
        export = Path(cfg["export_dir"])
        self.exports[step["name"]] = {"export": export, "hash": digest, "run_dir": Path(cfg["run_dir"])}
        info = export / STAGE
        if info.is_file() and step["name"] not in self.force:
            saved = json.loads(info.read_text(encoding="utf-8")).get("config_hash")
            if saved == digest:
                print(f"[recipe] {step['name']}: export {export} matches its config ({digest}): skipped")
                return
            print(f"[recipe] {step['name']}: config changed ({saved} -> {digest}): training")
        if not run:
            raise RecipeError(f"stage {step['name']!r} has no up-to-date export; run it first")
        forced = step["name"] in self.force  # --force: train from scratch instead of resuming last.ckpt
        cmd = [sys.executable, "-m", "t2i.cli.train", *overrides, *([] if forced else ["ckpt_path=last"])]
        print("[recipe] $ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            raise RecipeError(f"stage {step['name']!r} failed (see its output above); rerun the recipe to "
                              f"resume it from {cfg['run_dir']}/checkpoints/last.ckpt")
        if not info.is_file():
            raise ExportError(f"stage {step['name']!r} finished without writing {export}")

    def _command(self, step: dict) -> None:
        args = [self._resolve(str(a)) for a in step["run"]]
        if args[0] == "python":
            args[0] = sys.executable
        print("[recipe] $ " + " ".join(args), flush=True)
        if subprocess.run(args, check=False).returncode != 0:
            raise RecipeError(f"step {step['name']!r} failed: {' '.join(args)}")

    def _call(self, step: dict) -> None:
        module_name, func_name = step["function"].split(":")
        if not module_name.startswith("t2i."):
            raise RecipeError(f"step {step['name']!r}: only t2i functions may be called, not {module_name}")
        func = getattr(importlib.import_module(module_name), func_name)
        kwargs = {k: self._resolve_value(v) for k, v in (step.get("args") or {}).items()}
        kwargs.update(_parse_kv(self.stage_overrides[step["name"]]))
        func(**kwargs)


def _parse_kv(items: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in items)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="STAGE.KEY=VALUE for one stage, KEY=VALUE for all")
    p.add_argument("--only", help="run this step only (earlier training stages must be up to date)")
    p.add_argument("--force", action="append", default=[],
                   help="retrain this stage from scratch, even if its export is up to date")
    args = p.parse_args(argv)
    try:
        RecipeRunner(args.recipe, args.overrides, tuple(args.force)).run(args.only)
    except (RecipeError, ExportError) as e:
        sys.exit(f"[recipe] error: {e}")


if __name__ == "__main__":
    main()
