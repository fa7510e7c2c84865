"""Training curves of finished runs, one panel per run, as a PNG for the docs: the logged training loss (raw and
smoothed) and, where logged, the validation loss, read from each run's TensorBoard events or CSV metrics
(``<run_dir>/logs``; whichever the run wrote).

    python benchmarks/loss_curves.py runs/tiny-vae runs/tiny-ldm --out docs/images/loss_curves_ldm.png
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of a run's logs (TensorBoard events, else ``metrics.csv``)."""
    logs = Path(run_dir) / "logs"
    events = sorted(logs.rglob("events.out.tfevents.*")) if logs.is_dir() else []
    series: dict[str, list[tuple[int, float]]] = {}
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for path in events:
            acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    else:
        for path in sorted(logs.rglob("metrics.csv")) if logs.is_dir() else []:
            with path.open(newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    step = int(row.get("step") or 0)
                    for tag, value in row.items():
                        if tag not in ("step", "epoch") and value not in ("", None):
                            series.setdefault(tag, []).append((step, float(value)))
    if not series:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard events or metrics.csv under {logs}")
    return {tag: sorted(points) for tag, points in series.items()}


def smoothed(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's exponential moving average with its bias correction (the first points are not pulled to 0).
    Weight 0.6: the runs log one point every 20 steps, and 0.9 over so few points lagged visibly behind the raw
    curve."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_runs(run_dirs: list[str], out: str | Path, train_tag: str = "train/loss", val_tag: str = "val/loss") -> Path:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("loss curves need matplotlib (pip install -e '.[bench]')") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(run_dirs))
    rows = math.ceil(len(run_dirs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, run in zip(axes.flat, run_dirs):
        series = read_scalars(run)
        if train_tag not in series:
            raise KeyError(f"{run}: no {train_tag!r} logged (tags: {sorted(series)})")
        steps, values = zip(*series[train_tag])
        ax.plot(steps, values, alpha=0.25, color="tab:blue")
        ax.plot(steps, smoothed(list(values)), color="tab:blue", label=train_tag)
        if val_tag in series:
            vs, vv = zip(*series[val_tag])
            ax.plot(vs, vv, marker="o", color="tab:orange", label=val_tag)
        ax.set_title(Path(run).name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log" if min(values) > 0 else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(run_dirs):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    p.add_argument("--out", required=True)
    p.add_argument("--train-tag", default="train/loss")
    p.add_argument("--val-tag", default="val/loss")
    args = p.parse_args(argv)
    print(f"[loss_curves] wrote {plot_runs(args.runs, args.out, args.train_tag, args.val_tag)}")


if __name__ == "__main__":
    main()
