"""One figure per claim of benchmarks/claims.py (matplotlib, written as PNG beside the claims page): the sweeps as
lines over their axis (steps, guidance scale), the comparisons as bars; accuracy on the left, domain FID on the
right, both measured in the same run as the table, with their 95% intervals as error bars."""

from __future__ import annotations

import os
from pathlib import Path

from claims_common import Claim


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("the claims plots need matplotlib (pip install -e '.[bench]'), or pass --no-plots") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _split(key: str) -> tuple[str, float]:
    """'classifier-free 3' -> ('classifier-free', 3.0); '10 0' -> ('0', 10.0) (ddim: steps then η)."""
    head, _, tail = key.rpartition(" ")
    return head, float(tail)


def _errors(points: list[dict], key: str, scale: float = 1.0) -> list[list[float]] | None:
    """Matplotlib's (below, above) error lengths from each point's 95% interval (None for records without one)."""
    if not all("ci" in m and key in m["ci"] for m in points):
        return None
    return [[scale * (m[key] - m["ci"][key][0]) for m in points], [scale * (m["ci"][key][1] - m[key]) for m in points]]


def _lines(ax_acc, ax_fid, series: dict[str, list[tuple[float, dict]]], acc_key: str, xlabel: str, log: bool):
    for label, points in series.items():
        points = sorted(points, key=lambda p: p[0])
        xs, ms = [x for x, _ in points], [m for _, m in points]
        ax_acc.errorbar(xs, [100 * m[acc_key] for m in ms], yerr=_errors(ms, acc_key, 100), marker="o", capsize=3,
                        label=label)
        ax_fid.errorbar(xs, [m["fid"] for m in ms], yerr=_errors(ms, "fid"), marker="o", capsize=3, label=label)
    for ax in (ax_acc, ax_fid):
        ax.set_xlabel(xlabel)
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)


def _bars(ax_acc, ax_fid, data: dict[str, dict], acc_key: str):
    names = list(data)
    ms = [data[n] for n in names]
    ax_acc.barh(names, [100 * m[acc_key] for m in ms], xerr=_errors(ms, acc_key, 100), capsize=3, color="tab:blue")
    ax_fid.barh(names, [m["fid"] for m in ms], xerr=_errors(ms, "fid"), capsize=3, color="tab:orange")
    ax_fid.set_yticklabels([])
    for ax in (ax_acc, ax_fid):
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")


def plot_claim(claim: Claim, path: Path, page_dir: Path) -> str:
    """Draw the claim's figure into ``path``; returns its path relative to the page's folder."""
    plt = _pyplot()
    data = {k: v for k, v in claim.data.items() if isinstance(v, dict) and "fid" in v}
    acc_key, acc_label = "all", "all-attribute accuracy (%)"
    fig, (ax_acc, ax_fid) = plt.subplots(1, 2, figsize=(10, 3.6))
    if claim.key == "ddim_ddpm":
        series: dict[str, list] = {}
        for key, m in data.items():
            steps, eta = key.split(" ")
            series.setdefault(f"η={float(eta):g}", []).append((float(steps), m))
        _lines(ax_acc, ax_fid, series, acc_key, "sampling steps", log=True)
    elif claim.key in ("cfg", "thresholding", "classifier_vs_cfg"):
        series = {}
        for key, m in data.items():
            if claim.key == "cfg":
                split, scale = key.split(" ")
                name, x = f"{split} combinations", float(scale)
            elif claim.key == "thresholding":
                scale, mode = key.split(" ")
                name, x = mode, float(scale)
            else:
                name, x = _split(key)
            series.setdefault(name, []).append((x, m))
        if claim.key == "classifier_vs_cfg":
            acc_key, acc_label = "shape_color", "shape+colour accuracy (%)"
        _lines(ax_acc, ax_fid, series, acc_key, "guidance scale", log=False)
    else:
        _bars(ax_acc, ax_fid, data, acc_key)
    ax_acc.set_title(acc_label, fontsize=10)
    ax_fid.set_title("domain FID (lower is better)", fontsize=10)
    fig.suptitle(claim.title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(os.path.relpath(path, page_dir)).as_posix()
