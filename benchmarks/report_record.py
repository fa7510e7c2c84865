"""A benchmark's JSON record (the format benchmarks/report.py describes): its figures, the machine it ran on, its
settings and command line, written by each benchmark script's ``--json``. Standard library only at the top (torch
is read from ``sys.modules`` when a script has imported it)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def figure(value, unit: str, note: str | None = None) -> dict:
    """One figure of a record: ``{"value": ..., "unit": ...}`` (+ ``"note"``)."""
    out = {"value": value, "unit": unit}
    if note:
        out["note"] = note
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict:
    """The machine a benchmark ran on: CPU model, cores, torch's threads, GPU name (or None), versions, UTC
    date, 1-minute load average when it finished (a busy machine shows here)."""
    torch = sys.modules.get("torch")
    gpu = None
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads() if torch is not None else None,
        "gpu": gpu,
        "torch": torch.__version__ if torch is not None else None,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_1m": load,
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_label(record: dict) -> str:
    """The machine a record's figures belong to: the GPU's name for a run on CUDA, else the CPU and its cores."""
    m = record["machine"]
    if record.get("device", "cpu").startswith("cuda") and m.get("gpu"):
        return m["gpu"]
    cores = f", {m['cores']} cores" if m.get("cores") else ""
    return f"{m.get('cpu') or 'unknown CPU'}{cores}"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")  # 6 significant digits: far below the run-to-run noise
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_record(path: str | os.PathLike, benchmark: str, variant: str, args: argparse.Namespace | dict,
                 figures: dict, device: str = "cpu", script: str | None = None,
                 argv: list[str] | None = None) -> Path:
    """Write a benchmark's record. ``path`` ending in ``.json`` is the file; anything else is a folder that gets
    ``<benchmark>-<variant>-<machine>.json``. ``args``: the script's parsed arguments (``json`` and hidden ones
    dropped); ``script`` and ``argv`` (default: ``sys.argv``) give the command line recorded. Returns the file."""
    script = script or sys.argv[0]
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    settings = {k: v for k, v in settings.items() if k not in ("json", "child", "workdir")}
    record = {
        "benchmark": benchmark,
        "variant": variant,
        "device": device,
        "machine": machine_info(),
        "settings": _jsonable(settings),
        "command": shlex.join(["python", _display_path(script), *_drop_json(argv)]),
        "figures": _jsonable(figures),
        "source": "measured",
    }
    path = Path(path)
    if path.suffix != ".json":
        path = path / f"{benchmark}-{slug(variant)}-{slug(machine_label(record))}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    print(f"[report] wrote {path}", file=sys.stderr, flush=True)
    return path


def _drop_json(argv: list[str]) -> list[str]:
    """The command line without its ``--json`` option (where the record went is not a setting)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


def _display_path(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(REPO))
    except ValueError:
        return arg
