"""docs/performance.md from the benchmarks' JSON records: reading a results folder in report order, and the page
(machines, the summary of headline figures, one section per benchmark with a table per machine and its runs)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from report_record import machine_label

# section order and what each benchmark measures
BENCHMARKS = {
    "data_throughput": "samples/s of the t2i datamodule against a bare `webdataset` decode loop over the same "
                       "shards (same decode work, same batch and workers), and tiny-VAE training images/s.",
    "unet_step": "training-step time (forward + backward + AdamW) of our UNet against diffusers' "
                 "`UNet2DConditionModel` at a matched configuration (median step, best of two alternations).",
    "sampler": "DDIM time outside the network calls (classifier-free guidance batched), and the network time of "
               "one guided step: one call of 2B against two calls of B.",
    "efficient_unet": "training-step time of the Efficient U-Net against the plain UNet at (nearly) equal "
                      "parameter count, a super-resolution configuration (low-res input concatenated).",
    "train_throughput": "a short training of the real LDM stage through `train(cfg)` under each strategy: "
                        "images/s, step time, peak GPU memory, UNet FLOPs per image and MFU.",
}

# (headline, benchmark, regex on the figure name[, "name": the run column shows the figure's name, not the
# record's variant]): the summary at the top of the report, in this order
HEADLINES = (
    ("datamodule / bare WebDataset (samples/s)", "data_throughput", r": ratio$"),
    ("tiny VAE training images/s", "data_throughput", r"^tiny VAE training", "name"),
    ("UNet train step, ours / diffusers", "unet_step", r"^ours/diffusers$"),
    ("CFG: one call of 2B / two calls of B", "sampler", r"^CFG batched/two calls$"),
    ("sampler overhead (DDIM time outside the network)", "sampler", r"^sampler overhead$"),
    ("Efficient U-Net / plain UNet step time", "efficient_unet", r"^efficient/plain$"),
    ("LDM stage training images/s", "train_throughput", r": images/s$"),
    ("LDM stage training MFU", "train_throughput", r": MFU$"),
)


# ---- reading ------------------------------------------------------------------------------------------------
def load_records(results: str | os.PathLike) -> list[dict]:
    """Every record in ``results/*.json``, in report order (benchmark, machine, variant, date)."""
    records = []
    for path in sorted(Path(results).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not JSON ({e})") from e
        for record in data if isinstance(data, list) else [data]:
            missing = [k for k in ("benchmark", "machine", "settings", "figures") if k not in record]
            if missing:
                raise SystemExit(f"{path}: a record lacks {', '.join(missing)}")
            record.setdefault("variant", "")
            records.append(record)
    order = list(BENCHMARKS)

    def key(r):
        b = r["benchmark"]
        return (order.index(b) if b in order else len(order), b, machine_key(r), r["variant"],
                r["machine"].get("date") or "", json.dumps(r, sort_keys=True))
    return sorted(records, key=key)


def machine_key(record: dict) -> str:
    label = machine_label(record)
    source = record.get("source", "measured")
    return label if source == "measured" else f"{label}, {source}"


# ---- formatting ---------------------------------------------------------------------------------------------
def _num(v: float, unit: str) -> str:
    if isinstance(v, bool):
        return str(v)
    if unit in ("params", "calls", "images") or (isinstance(v, int) and unit not in ("x", "%")):
        return f"{int(v):,}"
    if unit == "x":
        return f"{v:.2f}"
    if unit in ("ms", "%"):
        return f"{v:.1f}"
    if unit in ("samples/s", "images/s"):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"
    if unit == "GiB":
        return f"{v:.2f}"
    return f"{v:.4g}"


def fmt_value(fig: dict) -> str:
    v, unit = fig.get("value"), fig.get("unit", "")
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)):
        text = "-".join(_num(x, unit) for x in v)
    elif isinstance(v, (int, float)):
        text = _num(v, unit)
    else:
        text = str(v)
    return f"{text}%" if unit == "%" else text


def _unit_header(metric: str, unit: str) -> str:
    return "" if unit in ("", "x", "%") or unit in metric else f" ({unit})"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _split(name: str) -> tuple[str, str] | None:
    row, sep, metric = name.partition(": ")
    return (row, metric) if sep else None


def machine_tables(records: list[dict]) -> list[str]:
    """The figures of one benchmark's records on one machine: a table of "<row>: <metric>" figures (one row per
    <row>, a variant column when there are several runs) and/or a table of plain figures (one column per run)."""
    lines: list[str] = []
    several = len(records) > 1
    # pivoted figures
    metrics: dict[str, str] = {}
    rows: list[tuple[str, str, dict]] = []
    for r in records:
        by_row: dict[str, dict] = {}
        for name, fig in r["figures"].items():
            split = _split(name)
            if split:
                by_row.setdefault(split[0], {})[split[1]] = fig
                metrics.setdefault(split[1], fig.get("unit", ""))
        rows += [(r["variant"], row, figs) for row, figs in by_row.items()]
    if rows:
        notes = any(f.get("note") for _, _, figs in rows for f in figs.values())
        header = (["run"] if several else []) + [""] + [m + _unit_header(m, u) for m, u in metrics.items()]
        header += ["note"] if notes else []
        body = []
        for variant, row, figs in rows:
            cells = ([variant] if several else []) + [row]
            cells += [fmt_value(figs[m]) if m in figs else "-" for m in metrics]
            if notes:
                cells.append("; ".join(dict.fromkeys(f["note"] for f in figs.values() if f.get("note"))))
            body.append(cells)
        lines += table(header, body) + [""]
    # plain figures
    names: dict[str, str] = {}
    for r in records:
        for name, fig in r["figures"].items():
            if not _split(name):
                names.setdefault(name, fig.get("unit", ""))
    if names:
        header = ["figure", "unit"] + ([r["variant"] or "value" for r in records] if several else ["value"])
        body = []
        for name, unit in names.items():
            cells = [name, unit]
            for r in records:
                fig = r["figures"].get(name)
                cells.append(fmt_value(fig) if fig else "-")
            body.append(cells)
        lines += table(header, body) + [""]
        plain_notes = [f"{name}: {r['figures'][name]['note']}" for r in records for name in names
                       if name in r["figures"] and r["figures"][name].get("note")]
        lines += [f"- {n}" for n in dict.fromkeys(plain_notes)] + ([""] if plain_notes else [])
    return lines


def _date(record: dict) -> str:
    d = record["machine"].get("date") or "date unknown"
    return d.replace("T", " ").replace("Z", " UTC")


def run_lines(records: list[dict]) -> list[str]:
    """One line per run: its variant, date, load, threads, command (or settings) and notes."""
    lines = []
    for r in records:
        m = r["machine"]
        bits = [_date(r)]
        if m.get("threads"):
            bits.append(f"{m['threads']} torch thread{'s' if m['threads'] != 1 else ''}")
        if m.get("load_1m") is not None:
            bits.append(f"load {m['load_1m']:.2f}")
        if m.get("torch"):
            bits.append(f"torch {m['torch']}")
        how = f"`{r['command']}`" if r.get("command") else "settings " + ", ".join(
            f"{k}={json.dumps(v)}" for k, v in r["settings"].items())
        variant = f"**{r['variant']}**: " if r["variant"] else ""
        lines.append(f"- {variant}{how} ({'; '.join(bits)})")
    notes = list(dict.fromkeys(r["note"] for r in records if r.get("note")))
    return lines + ([""] + notes if notes else [])


def machine_heading(records: list[dict]) -> str:
    r = records[0]
    m = r["machine"]
    label = machine_key(r)
    host = []
    if r.get("device", "cpu").startswith("cuda") and m.get("cpu"):
        host.append(f"host {m['cpu']}, {m.get('cores')} cores")
    return f"### {label}" + (f" ({'; '.join(host)})" if host else "")


def headline_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for title, bench, pattern, *how in HEADLINES:
        for r in records:
            if r["benchmark"] != bench:
                continue
            for name, fig in r["figures"].items():
                if re.search(pattern, name):
                    split = _split(name)
                    case = ", ".join(x for x in (r["variant"], split[0] if split else "") if x)
                    case = name if how == ["name"] else case
                    rows.append([title, machine_key(r), case, fmt_value(fig)])
    return rows


def render(records: list[dict]) -> str:
    machines: dict[str, dict] = {}
    for r in records:
        machines.setdefault(machine_key(r), r)
    lines = [
        "# Performance",
        "",
        ("Generated by `python benchmarks/report.py write` from the JSON records in `benchmarks/results/` (do not "
        "edit by hand). CPU records: `python benchmarks/report.py run --cpu`; GPU records: `bash "
        "benchmarks/gpu_check.sh` on a device machine, its `$OUT/results/*.json` copied into `benchmarks/results/`. "
        "What each benchmark measures and how: [benchmarks/README.md](../benchmarks/README.md). Each benchmark "
        "compares against its peer in the same process, so ratios are the figures to compare across machines; "
        "absolute times on a shared CPU move with its load (noted per run)."),
        "",
        "## Machines",
        "",
    ]
    body = []
    for key, r in machines.items():
        m = r["machine"]
        dates = sorted({(x["machine"].get("date") or "?")[:10] for x in records if machine_key(x) == key})
        body.append([key, m.get("cpu") or "-", str(m.get("cores") or "-"), m.get("gpu") or "-", m.get("torch") or "-",
                     ", ".join(dates), r.get("source", "measured")])
    lines += table(["machine", "CPU", "cores", "GPU", "torch", "date", "source"], body) + [""]
    lines += ["## Summary", ""]
    rows = headline_rows(records)
    lines += (table(["figure", "machine", "run", "value"], rows) if rows else ["No headline figures."]) + [""]
    for bench in dict.fromkeys(r["benchmark"] for r in records):
        group = [r for r in records if r["benchmark"] == bench]
        lines += [f"## {bench}", "", f"`benchmarks/{bench}.py`: {BENCHMARKS.get(bench, '')}".rstrip(": "), ""]
        for key in dict.fromkeys(machine_key(r) for r in group):
            runs = [r for r in group if machine_key(r) == key]
            lines += [machine_heading(runs), ""]
            lines += machine_tables(runs)
            lines += run_lines(runs) + [""]
    return "\n".join(lines).rstrip() + "\n"
