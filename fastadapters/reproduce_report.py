"""Results of `fastadapters reproduce`: the CSV (rewritten atomically per finished row), the markdown table, the
plot, and the chance baseline."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any


def chance_accuracy(records: Sequence[dict[str, Any]], kind: str) -> float:
    """Expected accuracy of a uniform random pick among each record's answer options ("Answer format: a/b/c"
    in the instruction); 0 for math (a number is never guessed)."""
    import re

    if kind == "math" or not records:
        return 0.0
    total = 0.0
    for r in records:
        m = re.search(r"Answer format:\s*(\S+)", r["instruction"])
        total += 1.0 / len(m.group(1).split("/")) if m else 0.0
    return total / len(records)


def read_results(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_results(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """The whole CSV, written to a temporary file and renamed over the old one (a kill leaves either)."""
    from .checkpoint import atomic_write_bytes

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def append_result(path: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Add (or replace, by row name) one finished row in the CSV at `path`, under an exclusive lock, re-reading the
    file first: several processes running disjoint --rows into one --out keep each other's rows. Returns the rows."""
    import fcntl

    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows: list[dict[str, Any]] = [r for r in read_results(path) if r["row"] != record["row"]]
        rows.append(record)
        write_results(path, rows)
    return rows


def _f(x: Any, fmt: str = ".3f") -> str:
    try:
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return "-"


def format_markdown(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    """The results table: accuracy per task (base -> adapter), average, trainable parameters, train time,
    tokens/s and peak memory per row."""
    base = next((r for r in rows if r["row"] == "base"), None)
    head = ["row", "adapter", *tasks, "avg", "trainable params", "train s", "train tok/s", "peak mem GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["row"], r["adapter"]]
        for t in [*tasks, "avg"]:
            acc = _f(r.get(f"acc_{t}"))
            if base is not None and r is not base and base.get(f"acc_{t}") not in (None, ""):
                acc = f"{_f(base[f'acc_{t}'])} -> {acc}"
            cells.append(acc)
        tp = r.get("trainable_params")
        cells += [f"{int(float(tp)):,} ({_f(r.get('trainable_pct'), '.2f')}%)" if tp not in (None, "", "0") else "-",
                  _f(r.get("train_seconds"), ".0f"), _f(r.get("tokens_per_s"), ",.0f"),
                  _f(r.get("peak_mem_gib"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    chance = [r.get(f"chance_{t}") for t in tasks] if rows else []
    if chance and all(c not in (None, "") for c in chance):
        vals = [float(c) for c in chance]
        lines.append("| chance | uniform random answer | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | {sum(vals) / len(vals):.3f} | - | - | - | - |")
    if rows:
        r0 = rows[0]
        trained = [r for r in rows if r["row"] != "base"]
        n = ", ".join(f"{t} {r0.get(f'n_{t}', '?')}" for t in tasks)
        lines.append("")
        train = ""
        if trained:
            t0 = trained[0]
            train = (f"each adapter trained on the same {t0.get('n_train_total')} training records ({t0.get('steps')} "
                     f"steps of {t0.get('batch_size')}); ")
        commits = sorted({str(r.get("commit")) for r in rows})
        dates = sorted({str(r.get("date")) for r in rows})
        loads = [float(r["loadavg_1min"]) for r in rows if r.get("loadavg_1min") not in (None, "")]
        load = f" (1-min load average {min(loads):.0f}-{max(loads):.0f} when rows finished)" if loads else ""
        lines.append(f"Model {r0.get('model')}; preset {r0.get('preset')}; {train}test records per task: {n}; "
                     f"greedy decoding. Machine: {r0.get('machine')}{load}; torch {r0.get('torch')}, transformers "
                     f"{r0.get('transformers')}; {', '.join(dates)}; commit {', '.join(commits)}.")
    return "\n".join(lines) + "\n"


def plot_results(rows: Sequence[dict[str, Any]], tasks: Sequence[str], path: str, title: str = "") -> bool:
    """Grouped bars: accuracy by task, one bar per row. False (and a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[reproduce] matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    cols = [*tasks, "avg"]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(cols) + 0.35 * len(rows)), 4.2))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        vals = [float(r.get(f"acc_{t}") or 0.0) for t in cols]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, vals, width, label=r["row"], color="0.6" if r["row"] == "base" else None)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(rows)), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
