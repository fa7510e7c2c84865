"""What the recipe runner (`t2i.cli.recipe`) says about time and results.

- Before anything runs: how long the steps that will run took on the recipe's reference machine (each step's
  ``expect.seconds``; skipped steps count 0), `reference_line`.
- Once the first training stage that runs has timed its steps (the ``progress.json`` that
  `t2i.callbacks.step_timing.StepTiming` writes into its run folder): how long the whole job will take on this
  machine, `estimate_remaining` and `measured_line`. The stage's remaining steps are counted at the measured
  speed, the later steps at their reference times scaled by (measured / reference seconds per step).
- At the end: one screen with every step's action and wall time, the metrics each training stage names in
  ``summary_metrics``, and the summary lines the ``call`` steps returned, `format_summary`.

Everything here is a pure function of its arguments (the runner reads the files and the clock).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


def duration(seconds: float) -> str:
    """``45 s`` under a minute, ``17 min`` above."""
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.0f} min"


def reference_line(machine: str | None, expected: dict[str, float | None], trains: bool) -> str:
    """The line printed after the plan. `expected`: each step that will run -> its ``expect.seconds`` (None:
    the recipe gives none). `trains`: whether a training stage will run (and so a measured estimate follow)."""
    known = sum(s for s in expected.values() if s is not None)
    unknown = [name for name, s in expected.items() if s is None]
    line = (f"[recipe] about {duration(known)} on the reference machine ({machine or 'not named'}) for the "
            f"steps that will run")
    if unknown:
        line += f" (unknown: {', '.join(unknown)})"
    if trains:
        line += "; a measured estimate for this machine follows the first training steps"
    return line


def read_progress(path: Path, since: float) -> dict | None:
    """A StepTiming progress.json written at or after `since` (``time.time()``), None when there is none yet.
    An older file is an earlier run's: its speed may be another config's or another machine's."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not all(isinstance(info.get(k), (int, float))
                                             for k in ("step", "max_steps", "step_seconds", "time")):
        return None
    return info if info["time"] >= since else None


@dataclass(frozen=True)
class Estimate:
    remaining: float  # seconds left: this stage's remaining steps and the later steps
    ratio: float | None  # measured / reference seconds per step; None without a reference
    unknown: tuple[str, ...]  # the steps whose time is not in `remaining`


def estimate_remaining(stage: str, step: int, max_steps: int, step_seconds: float,
                       reference_step_seconds: float | None, later: dict[str, float | None]) -> Estimate:
    """Time left once `stage` is at global step `step` of `max_steps` at `step_seconds` per step. `later`: each
    step after it that will run -> its reference seconds (None: unknown), scaled by the measured ratio to the
    stage's `reference_step_seconds`; without one the later steps count at their reference times unscaled.
    A stage without a step limit (``max_steps`` -1: it runs for epochs) has no remaining time to count."""
    ratio = step_seconds / reference_step_seconds if reference_step_seconds else None
    unknown = [] if max_steps >= 0 else [stage]
    remaining = max(0, max_steps - step) * step_seconds if max_steps >= 0 else 0.0
    for name, seconds in later.items():
        if seconds is None:
            unknown.append(name)
        else:
            remaining += seconds * (ratio if ratio is not None else 1.0)
    return Estimate(remaining, ratio, tuple(unknown))


def measured_line(stage: str, step_seconds: float, reference_step_seconds: float | None, estimate: Estimate,
                  elapsed: float, now: float) -> str:
    """``[recipe] this machine: vae at 0.41 s/step (reference 0.35 s/step, ratio 1.18): the whole job about
    18 min, done about 14:32``; `elapsed`: seconds since the recipe started, `now`: ``time.time()``."""
    if estimate.ratio is None:
        reference = "no reference s/step: later steps counted at their reference times"
    else:
        reference = f"reference {reference_step_seconds:.3g} s/step, ratio {estimate.ratio:.2f}"
    done = time.strftime("%H:%M", time.localtime(now + estimate.remaining))
    line = (f"[recipe] this machine: {stage} at {step_seconds:.3g} s/step ({reference}): the whole job about "
            f"{duration(elapsed + estimate.remaining)}, done about {done}")
    if estimate.unknown:
        line += f" (not counting: {', '.join(estimate.unknown)})"
    return line


@dataclass(frozen=True)
class Outcome:
    """One step's row in the summary."""

    name: str
    action: str
    seconds: float
    details: str = ""  # a training stage's s/step and metrics


def stage_details(step_seconds: float | None, metrics: dict, names: list[str] | tuple[str, ...]) -> str:
    """``0.31 s/step  val/psnr 30.12``: the measured speed (None: not measured) and the named metrics of a stage
    export's stage.json (``n/a`` for one it does not hold)."""
    parts = [] if step_seconds is None else [f"{step_seconds:.3g} s/step"]
    for name in names:
        value = metrics.get(name)
        parts.append(f"{name} {value:.4g}" if isinstance(value, (int, float)) else f"{name} n/a")
    return "  ".join(parts)


def format_summary(recipe: str | Path, outcomes: list[Outcome], lines: list[str]) -> str:
    """The end-of-run block: a row per step, the total, then the `lines` the call steps returned."""
    width = max(len("total"), *(len(o.name) for o in outcomes)) + 2
    rows = [f"[recipe] ===== summary ({recipe}) =====", f"{'step':<{width}}{'action':<9}{'time':>7}"]
    rows += [f"{o.name:<{width}}{o.action:<9}{o.seconds:>5.0f} s" + (f"   {o.details}" if o.details else "")
             for o in outcomes]
    total = sum(o.seconds for o in outcomes)
    rows.append(f"{'total':<{width}}{'':<9}{total:>5.0f} s ({total / 60:.1f} min)")
    return "\n".join([*rows, *lines])
