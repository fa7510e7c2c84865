"""Run a recipe: an ordered list of steps (data preparation, training stages, evaluation) where later
steps use earlier stages' exports.

    python -m t2i.cli.recipe recipes/ldm.yaml [STAGE.KEY=VALUE ...] [--only STAGE] [--force STAGE] [--plan]

A training stage runs as ``python -m t2i.cli.train experiment=...`` in a subprocess (so DDP launches
work as on the command line) with ``ckpt_path=last``: an interrupted stage resumes. A stage whose export
exists and was trained from the same config (hash in stage.json, parents included) is skipped.
``vae.trainer.max_steps=100`` overrides a setting of the stage named ``vae``; ``trainer.devices=4``
(no stage prefix) applies to every training stage. In a step's strings ``${stage:NAME}`` is an earlier training
stage's export folder (``${stage:NAME.hash}`` its config hash, ``${stage:NAME.run_dir}`` its run folder); a
``call`` argument that is exactly ``${config:FILE.KEY}`` is KEY of the config tree's ``FILE.yaml`` (e.g.
``${config:sample_prompts/shapes.sample_prompts}``), so that recipes and configs share one copy.

Before anything runs the whole plan is decided and printed, one line per step: each training stage's config
composed and hashed, and whether it trains (no export yet), retrains (its export is from another config),
trains from scratch (``--force``) or is skipped. ``--plan`` prints it and runs nothing.

Timing (`t2i.cli.recipe_progress`): a step may give ``expect: {seconds: ..., step_seconds: ...}``, its wall
seconds (and a training stage's seconds per step) on the machine the recipe's ``reference_machine:`` names.
After the plan the runner prints how long the steps that will run took there; once each training stage that
runs has timed its first steps (its ``progress.json``), how long the rest of the job will take on this machine
at that stage's speed and when it will be done. At the end it prints a summary: every step's time, the metrics each training stage
names in ``summary_metrics:`` (from its export's stage.json), and the lines a ``call`` step returns under
``"summary"``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from t2i.callbacks.step_timing import PROGRESS
from t2i.cli.config import compose_config, config_dir
from t2i.cli.recipe_progress import (
    Outcome,
    estimate_remaining,
    format_summary,
    measured_line,
    read_progress,
    reference_line,
    stage_details,
)
from t2i.exports import STAGE, ExportError, config_hash

STAGE_REF = re.compile(r"\$\{stage:([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_]+))?\}")
CONFIG_REF = re.compile(r"\$\{config:([A-Za-z0-9_/-]+)\.([A-Za-z0-9_.]+)\}")
POLL_SECONDS = 2.0  # how often a running training stage's progress.json is looked for


class RecipeError(RuntimeError):
    pass


# What a step will do. A training stage: TRAIN (no export yet), RETRAIN (its export was trained from another
# config), FORCE (--force: from scratch, not resuming last.ckpt) or SKIP (its export is from this config).
# A command or call step: RUN.
TRAIN, RETRAIN, FORCE, SKIP, RUN = "train", "retrain", "force", "skip", "run"


@dataclass(frozen=True)
class PlannedStep:
    """One step as `RecipeRunner.run` will take it, decided before anything runs."""

    name: str
    kind: str  # train | command | call
    action: str  # TRAIN, RETRAIN, FORCE or SKIP for a training stage, RUN for the others
    reason: str  # what the user reads: why this action
    config_hash: str | None = None  # a training stage's (its parents' hashes included)
    saved_hash: str | None = None  # the hash in its export's stage.json, when there is one
    export: Path | None = None
    run_dir: Path | None = None
    argv: tuple[str, ...] = ()  # the command line of a training stage or command step
    function: str = ""  # a call step's module:function
    kwargs: dict = field(default_factory=dict)  # and its arguments
    expect: dict = field(default_factory=dict)  # seconds (and step_seconds) on the reference machine
    summary_metrics: tuple[str, ...] = ()  # a training stage's export metrics shown in the summary

    def line(self) -> str:
        return f"{self.name}: {self.reason}"


def train_action(config_hash: str, saved_hash: str | None, forced: bool) -> str:
    """What a training stage needs, from its config hash, its export's (None: no export) and --force."""
    if forced:
        return FORCE
    if saved_hash is None:
        return TRAIN
    return SKIP if saved_hash == config_hash else RETRAIN


def format_plan(path: str | Path, planned: list[PlannedStep]) -> str:
    return "\n".join([f"[recipe] plan of {path}:", *(f"[recipe]   {p.line()}" for p in planned)])


def _stage_info(info: Path) -> dict | None:
    """An export's stage.json, None when there is none; one that is not a JSON object is an error."""
    if not info.is_file():
        return None
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
        problem = None if isinstance(data, dict) else f"a JSON {type(data).__name__}"
    except json.JSONDecodeError as e:
        problem = str(e)
    if problem:
        raise RecipeError(f"{info} is not a stage.json (a JSON object with a config_hash): {problem}; delete that "
                          f"export or pass --force to retrain it")
    return data


def _saved_hash(info: Path) -> str | None:
    """The config hash an export's stage.json records, None when there is no stage.json."""
    data = _stage_info(info)
    return None if data is None else str(data.get("config_hash"))


def _export_metrics(info: Path) -> dict:
    """The metrics an export's stage.json records ({} when it records none)."""
    metrics = (_stage_info(info) or {}).get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def _check_timing_keys(path: Path, step: dict) -> None:
    """``expect`` and ``summary_metrics`` well formed, so that a typo fails before anything runs."""
    name, train = step["name"], step.get("kind", "train") == "train"
    expect = step.get("expect") or {}
    allowed = {"seconds", "step_seconds"} if train else {"seconds"}
    if not isinstance(expect, dict) or set(expect) - allowed or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in expect.values()):
        raise RecipeError(f"{path}: step {name!r}: expect must map {' and '.join(sorted(allowed))} to positive "
                          f"numbers of seconds, not {expect!r}")
    metrics = step.get("summary_metrics") or []
    if metrics and (not train or not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics)):
        raise RecipeError(f"{path}: step {name!r}: summary_metrics must be a list of metric names of a training "
                          f"stage, not {metrics!r}")


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
        for step in self.steps:
            _check_timing_keys(self.path, step)
        self.reference_machine = self.recipe.get("reference_machine")
        self.stage_overrides, self.global_overrides = self._split_overrides(list(overrides), names)
        unknown = sorted(set(force) - {s["name"] for s in self.steps if s.get("kind", "train") == "train"})
        if unknown:
            raise RecipeError(f"{self.path}: --force {unknown} names no training stage; the steps are {names}")
        self.force = set(force)
        self.exports: dict[str, dict] = {}  # stage name -> {"export": path, "hash": config hash}
        self._started = 0.0  # when `run` began (time.time()): the estimate's elapsed time counts from it

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
        """``${stage:...}`` references resolved in a string, or in the strings of a (nested) list or dict; a
        string that is a ``${config:...}`` reference replaced by the config value it names."""
        if isinstance(value, str):
            ref = CONFIG_REF.fullmatch(value)
            return self._config_value(ref.group(1), ref.group(2)) if ref else self._resolve(value)
        if isinstance(value, list):
            return [self._resolve_value(v) for v in value]
        if isinstance(value, dict):
            return {k: self._resolve_value(v) for k, v in value.items()}
        return value

    def _config_value(self, file: str, key: str):
        """``${config:FILE.KEY}``: KEY (dotted) of ``FILE.yaml`` in the config tree."""
        path = config_dir() / f"{file}.yaml"
        value = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise RecipeError(f"{self.path}: '${{config:{file}.{key}}}': {path} has no {key!r}")
            value = value[part]
        return value

    def _resolve(self, text: str) -> str:
        if CONFIG_REF.search(text):
            raise RecipeError(f"{self.path}: {text!r}: a ${{config:...}} reference must be a call argument's "
                              f"whole value")

        def sub(m: re.Match) -> str:
            name, attr = m.group(1), m.group(2) or "export"
            if name not in self.exports:
                raise RecipeError(f"{self.path}: '{m.group(0)}' refers to stage {name!r}, which has not run "
                                  f"before this step (order the steps so that it does)")
            return str(self.exports[name][attr])
        return STAGE_REF.sub(sub, text)

    def plan(self, only: str | None = None) -> list[PlannedStep]:
        """The steps `run` takes, in order, and what each will do, decided without running anything. With
        `only`, the training stages before it must be up to date (a RecipeError names the first that is not)
        and the steps after it are left out: they cannot feed it."""
        kinds = {s["name"]: s.get("kind", "train") for s in self.steps}
        if only and only not in kinds:
            raise RecipeError(f"{self.path}: --only {only!r} names no step; the steps are {list(kinds)}")
        self.exports = {}
        planned = []
        for step in self.steps:
            name = step["name"]
            if only and name != only and kinds[name] != "train":
                continue
            planned.append(replace(self._plan_step(step, run=(only is None or only == name)),
                                   expect=dict(step.get("expect") or {}),
                                   summary_metrics=tuple(step.get("summary_metrics") or ())))
            if only == name:
                break
        return planned

    def reference_line(self, planned: list[PlannedStep]) -> str | None:
        """How long the steps that will run took on the reference machine; None when the recipe gives no
        reference times."""
        if not self.reference_machine and not any(p.expect for p in planned):
            return None
        expected = {p.name: p.expect.get("seconds") for p in planned if p.action != SKIP}
        return reference_line(self.reference_machine, expected,
                              trains=any(p.kind == "train" and p.action != SKIP for p in planned))

    def plan_text(self, planned: list[PlannedStep]) -> str:
        """The plan, one line per step, and how long the steps that will run took on the reference machine."""
        line = self.reference_line(planned)
        return format_plan(self.path, planned) + (f"\n{line}" if line else "")

    def run(self, only: str | None = None) -> dict[str, dict]:
        planned = self.plan(only)
        print(self.plan_text(planned), flush=True)
        self._started = time.time()
        # each training stage that runs measures this machine's speed anew and re-estimates the rest of the job
        # from it: one stage's ratio to the reference machine need not hold for the next (bf16 speeds the VAE's
        # convolutions up more than the LDM's attention)
        outcomes, summary = [], []
        for i, step in enumerate(planned):
            start = time.time()
            print(f"\n[recipe] ===== {step.name} ({step.kind}) =====", flush=True)
            later = ({p.name: p.expect.get("seconds") for p in planned[i + 1:] if p.action != SKIP}
                     if step.kind == "train" and step.action != SKIP else None)
            result = self._execute(step, later)
            seconds = time.time() - start
            print(f"[recipe] {step.name}: {seconds:.0f}s", flush=True)
            outcomes.append(self._outcome(step, seconds, start))
            if isinstance(result, dict) and isinstance(result.get("summary"), list):
                summary += [str(s) for s in result["summary"]]
        print("\n" + format_summary(self.path, outcomes, summary), flush=True)
        return self.exports

    def _outcome(self, step: PlannedStep, seconds: float, start: float) -> Outcome:
        if step.kind != "train":
            return Outcome(step.name, step.action, seconds)
        progress = read_progress(step.run_dir / PROGRESS, start) if step.action != SKIP else None
        details = stage_details(progress["step_seconds"] if progress else None,
                                _export_metrics(step.export / STAGE), step.summary_metrics)
        return Outcome(step.name, step.action, seconds, details)

    def stage_config(self, step: dict) -> tuple[list[str], dict]:
        early = [n for n in step.get("parents", []) if n not in self.exports]
        if early:
            raise RecipeError(f"{self.path}: stage {step['name']!r} lists parents {early} that are not training "
                              f"stages before it")
        parents = {n: self.exports[n]["hash"] for n in step.get("parents", [])}
        own = self.stage_overrides[step["name"]]
        experiment = next((o.split("=", 1)[1] for o in own if o.startswith("experiment=")), step["experiment"])
        overrides = [f"experiment={experiment}", *map(self._resolve, step.get("overrides", [])),
                     *(f"+parents.{n}={h}" for n, h in parents.items()),
                     *self.global_overrides, *(o for o in own if not o.startswith("experiment="))]
        cfg = compose_config(overrides)
        return overrides, OmegaConf.to_container(cfg, resolve=True)

    def _plan_step(self, step: dict, run: bool) -> PlannedStep:
        name, kind = step["name"], step.get("kind", "train")
        if kind == "train":
            return self._plan_train(step, run)
        if kind == "command":
            args = [self._resolve(str(a)) for a in step["run"]]
            if args[0] == "python":
                args[0] = sys.executable
            return PlannedStep(name, kind, RUN, "$ " + " ".join(args), argv=tuple(args))
        if kind == "call":
            function = step["function"]
            module_name, _, func_name = function.partition(":")
            if not module_name.startswith("t2i.") or not func_name:
                raise RecipeError(f"step {name!r}: function must be a t2i module:function, not {function!r}")
            kwargs = {k: self._resolve_value(v) for k, v in (step.get("args") or {}).items()}
            kwargs.update(_parse_kv(self.stage_overrides[name]))
            return PlannedStep(name, kind, RUN, f"call {function}", function=function, kwargs=kwargs)
        raise RecipeError(f"{self.path}: step {name!r} has unknown kind {kind!r}")

    def _plan_train(self, step: dict, run: bool) -> PlannedStep:
        """Compose the stage's config, hash it, and compare with its export's stage.json. Registers the
        stage's export and hash for the ``${stage:...}`` references of the steps after it."""
        name = step["name"]
        overrides, cfg = self.stage_config(step)
        digest = config_hash(cfg)
        export, run_dir = Path(cfg["export_dir"]), Path(cfg["run_dir"])
        self.exports[name] = {"export": export, "hash": digest, "run_dir": run_dir}
        saved = _saved_hash(export / STAGE)
        action = train_action(digest, saved, name in self.force)
        reason = {TRAIN: f"no export at {export}: train ({digest})",
                  RETRAIN: f"config changed ({saved} -> {digest}): retrain",
                  FORCE: f"--force: train from scratch ({digest})",
                  SKIP: f"export {export} matches its config ({digest}): skip"}[action]
        if not run and action != SKIP:
            raise RecipeError(f"stage {name!r} has no up-to-date export ({reason}); run it first")
        # FORCE starts over; the others resume <run_dir>/checkpoints/last.ckpt when an interrupted run left one
        argv = (sys.executable, "-m", "t2i.cli.train", *overrides, *([] if action == FORCE else ["ckpt_path=last"]))
        return PlannedStep(name, "train", action, reason, config_hash=digest, saved_hash=saved, export=export,
                           run_dir=run_dir, argv=argv)

    def _execute(self, step: PlannedStep, later: dict[str, float | None] | None = None):
        """Run one step; a call step's return value is returned. `later` (the steps after it that will run, with
        their reference seconds) makes a training stage print the job's estimate from its measured speed."""
        if step.action == SKIP:
            print(f"[recipe] {step.name}: up to date, skipped", flush=True)
        elif step.kind == "train":
            print("[recipe] $ " + " ".join(step.argv), flush=True)
            if self._run_stage(step, later) != 0:
                raise RecipeError(f"stage {step.name!r} failed (see its output above); rerun the recipe to "
                                  f"resume it from {step.run_dir}/checkpoints/last.ckpt")
            if not (step.export / STAGE).is_file():
                raise ExportError(f"stage {step.name!r} finished without writing {step.export}")
        elif step.kind == "command":
            print("[recipe] $ " + " ".join(step.argv), flush=True)
            if subprocess.run(list(step.argv), check=False).returncode != 0:
                raise RecipeError(f"step {step.name!r} failed: {' '.join(step.argv)}")
        else:
            module_name, func_name = step.function.split(":")
            return getattr(importlib.import_module(module_name), func_name)(**step.kwargs)
        return None

    def _run_stage(self, step: PlannedStep, later: dict[str, float | None] | None) -> int:
        """Run a training stage's subprocess (its output goes to ours) and return its exit status. With `later`,
        print the job's estimate once the stage's progress.json appears (or when it ends, if it ends first)."""
        progress = step.run_dir / PROGRESS
        progress.unlink(missing_ok=True)  # an earlier run's file holds another run's speed
        launched = time.time()
        with subprocess.Popen(list(step.argv)) as process:
            try:
                while True:
                    try:
                        returncode = process.wait(timeout=POLL_SECONDS)
                    except subprocess.TimeoutExpired:
                        if later is not None and self._print_estimate(step, progress, launched, later):
                            later = None
                        continue
                    if returncode == 0 and later is not None:
                        self._print_estimate(step, progress, launched, later)
                    return returncode
            except BaseException:  # as subprocess.run does: a Ctrl-C or an error here leaves no stage running
                process.kill()
                raise

    def _print_estimate(self, step: PlannedStep, progress: Path, launched: float,
                        later: dict[str, float | None]) -> bool:
        info = read_progress(progress, launched)
        if info is None:
            return False
        reference = step.expect.get("step_seconds")
        estimate = estimate_remaining(step.name, int(info["step"]), int(info["max_steps"]), info["step_seconds"],
                                      reference, later)
        now = time.time()
        # on a line of its own: the stage's progress bar leaves the cursor at the end of its line
        print("\n" + measured_line(step.name, info["step_seconds"], reference, estimate,
                                   elapsed=now - self._started, now=now), flush=True)
        return True


def _parse_kv(items: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in items)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="STAGE.KEY=VALUE for one stage, KEY=VALUE for all")
    p.add_argument("--only", help="run this step only (earlier training stages must be up to date)")
    p.add_argument("--force", action="append", default=[],
                   help="retrain this stage from scratch, even if its export is up to date")
    p.add_argument("--plan", action="store_true",
                   help="print what each step would do (train, retrain, skip, and why) and run nothing")
    args = p.parse_intermixed_args(argv)  # options before, between or after the overrides
    try:
        runner = RecipeRunner(args.recipe, args.overrides, tuple(args.force))
        if args.plan:
            print(runner.plan_text(runner.plan(args.only)))
        else:
            runner.run(args.only)
    except (RecipeError, ExportError) as e:
        sys.exit(f"[recipe] error: {e}")


if __name__ == "__main__":
    main()
