"""PNG charts from a results CSV: per op, time and peak memory against tokens, one line per provider, floor dashed.

    python -m benchmarks.plot benchmarks/results/results.csv [--out benchmarks/results/plots] [--gpu H200]

For each op (the ceilings excepted) the latest run in the CSV is drawn; one PNG per variant of the op (its shape
without the token counts: `lora_linear__K=4096_N=4096_r=16_p=0.05.png`, `model_step__adapter=series_...png`), with
a column per mode and a row per metric: the time (ms, or ms/token for decode) and, where measured, peak_MiB. The
x axis is tokens per call (M, B*L or `tokens=`), a line per provider with the 20th-80th percentile band, and the
floor rows of the op (provider floor / no_adapter) drawn dashed in every chart of the op. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from benchmarks import common

TIME_METRICS = ("ms", "ms/token")
MEMORY_METRIC = "peak_MiB"
SKIP_OPS = ("ceiling",)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._+-]+", "_", text).strip("_")[:120]


def _series(rows: list[dict[str, str]], metric: str, mode: str) -> dict[str, list[tuple[int, float, float, float]]]:
    """provider (+ variant for floors) -> sorted (tokens, p50, p20, p80) of `metric` in `mode`."""
    out: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
    for r in rows:
        x = common.tokens_of(r["shape"])
        if r["metric"] != metric or r["mode"] != mode or x is None or not r["p50"]:
            continue
        out[r["provider"]].append((x, float(r["p50"]), float(r["p20"] or r["p50"]), float(r["p80"] or r["p50"])))
    return {k: sorted(v) for k, v in out.items()}


def charts(rows: Sequence[dict[str, str]]) -> dict[tuple[str, str], tuple[list[dict], list[dict]]]:
    """(op, variant) -> (that variant's rows, the op's floor rows), for the latest run of every plotted op."""
    latest = [r for r in common.latest_run(rows) if r["op"] not in SKIP_OPS]
    floors: dict[str, list[dict]] = defaultdict(list)
    by_variant: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in latest:
        if r["provider"] in common.FLOOR_PROVIDERS:
            floors[r["op"]].append(r)
        else:
            by_variant[(r["op"], common.variant_of(r["shape"]))].append(r)
    return {key: (vrows, floors[key[0]]) for key, vrows in by_variant.items()}


def draw_chart(path: Path, title: str, rows: list[dict], floor_rows: list[dict]) -> list[str]:
    """One PNG at `path`; returns the labels of the lines drawn (for the tests and the summary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = rows + floor_rows
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    modes += sorted({r["mode"] for r in rows} - set(modes))
    metrics = [next((m for m in TIME_METRICS if any(r["metric"] == m for r in both)), TIME_METRICS[0])]
    if any(r["metric"] == MEMORY_METRIC for r in both):
        metrics.append(MEMORY_METRIC)
    fig, axes = plt.subplots(len(metrics), len(modes), figsize=(max(7.0, 4.6 * len(modes)), 3.4 * len(metrics)),
                             squeeze=False)
    labels: list[str] = []
    for i, metric in enumerate(metrics):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for provider, pts in _series(rows, metric, mode).items():
                xs = [p[0] for p in pts]
                ax.plot(xs, [p[1] for p in pts], marker="o", label=provider)
                ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
            for provider, pts in _series(floor_rows, metric, mode).items():
                if len(pts) == 1:  # one token count: a level to compare against
                    ax.axhline(pts[0][1], color="k", linestyle="--", label=provider)
                else:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", marker="x", label=provider)
            ax.set_ylim(bottom=0)
            handles, names = ax.get_legend_handles_labels()
            labels += [n for n in names if n not in labels]
            if handles:
                ax.legend(fontsize=8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}", fontsize=10)
            ax.set_xlabel("tokens per call")
            ax.set_ylabel(metric)
            ax.grid(True, alpha=0.3)
    meta = (rows or floor_rows)[0]
    fig.suptitle(f"{title}\n{meta['gpu']}, {meta['dtype']}, torch {meta['torch']}, {meta['date']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return labels


def plan(rows: Sequence[dict[str, str]], out_dir: str | Path) -> dict[Path, tuple[str, list[dict], list[dict]]]:
    """PNG path -> (title, rows, floor rows) of every chart of `rows` (no drawing: readme_table links these)."""
    groups = charts(rows)
    per_op: dict[str, int] = defaultdict(int)
    for op, _ in groups:
        per_op[op] += 1
    out: dict[Path, tuple[str, list[dict], list[dict]]] = {}
    for (op, variant), (vrows, frows) in groups.items():
        name = op if per_op[op] == 1 else f"{op}__{_slug(variant)}"
        out[Path(out_dir) / f"{name}.png"] = (f"{op}  {variant}", vrows, frows)
    return out


def load(csv_paths: Sequence[str | Path], gpu: str | None = None) -> list[dict[str, str]]:
    """The rows of the CSVs (those whose gpu contains `gpu`, if given)."""
    rows = [r for p in csv_paths for r in common.read_rows(p)]
    return [r for r in rows if gpu.lower() in r["gpu"].lower()] if gpu else rows


def draw(csv_paths: Sequence[str | Path], out_dir: str | Path, gpu: str | None = None) -> dict[Path, list[str]]:
    """Draw every chart of the CSVs' rows (those whose gpu contains `gpu`, if given) into `out_dir`.

    Returns PNG path -> labels of its lines.
    """
    return {path: draw_chart(path, *spec) for path, spec in plan(load(csv_paths, gpu), out_dir).items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+", help="results CSV file(s)")
    p.add_argument("--out", default=str(common.DEFAULT_OUT / "plots"), help="folder for the PNGs")
    p.add_argument("--gpu", default=None, help="only rows whose gpu column contains this (e.g. H200)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        print("note: plots skipped, matplotlib is not installed (pip install matplotlib; the CSV holds every "
              "number: draw them later with python -m benchmarks.plot CSV)", flush=True)
        return 0
    drawn = draw(args.csv, args.out, args.gpu)
    for path, labels in drawn.items():
        print(f"plot: {path} ({', '.join(labels)})")
    if not drawn:
        print("note: no rows to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
