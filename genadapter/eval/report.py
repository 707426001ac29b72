"""Evaluation output: a table on stdout, the results as JSON, and one bar chart per suite."""

from __future__ import annotations

import json
from pathlib import Path

from ..state import atomic_write

METHOD_ORDER = ("base", "prompt", "adapter", "memory", "memory+adapter", "sft")
COLOURS = {
    "base": "#9e9e9e",
    "prompt": "#1f77b4",
    "adapter": "#d62728",
    "memory": "#9467bd",
    "memory+adapter": "#ff7f0e",
    "sft": "#2ca02c",
}


def _cell(value) -> str:
    if value is None:
        return "-"
    value += 0.0  # no "-0.000"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _seconds(method: dict | None) -> str:
    """A method's seconds, absorbing included ('' for a suite without that method)."""
    if method is None:
        return ""
    return _cell(method["seconds"] + method.get("absorb_seconds", 0))


def format_table(results: dict) -> str:
    """One line per suite row and metric; 'recovered' = (adapter - base) / (prompt - base). Under
    the tables, notes: SFT's training, and each row's own "notes" lines when it has some."""
    header = ["suite", "metric", "n", *METHOD_ORDER, "recovered", "adapter s", "prompt s"]
    lines = [header]
    for rows in results["suites"].values():
        for row in rows:
            m = row["methods"]
            for metric in row["metrics"]:
                lines.append(
                    [
                        row["name"],
                        metric + ("" if row["higher_is_better"] else " (lower=better)"),
                        str(row["n"]),
                        *(_cell(m[k][metric]) if k in m else "" for k in METHOD_ORDER),
                        _cell(row["recovered"].get(metric)),
                        _seconds(m.get("adapter")),
                        _seconds(m.get("prompt")),
                    ]
                )
    text = _align(lines)
    for suite, rows in results["suites"].items():  # suites with more methods: their own table
        extra = [n for n in _methods(rows) if n not in METHOD_ORDER]
        if extra:
            names = _methods(rows)
            block = [[suite, "n", *names]]
            for row in rows:
                metric = row["metric"] + ("" if row["higher_is_better"] else " (lower=better)")
                block.append(
                    [
                        metric,
                        str(row["n"]),
                        *(
                            _cell(row["methods"][k][row["metric"]]) if k in row["methods"] else ""
                            for k in names
                        ),
                    ]
                )
            text += ["", *_align(block)]
    notes = []
    for rows in results["suites"].values():
        for row in rows:
            sft = row["methods"].get("sft")
            if sft:
                notes.append(
                    f"{row['name']}: sft = LoRA fine-tuned {sft['steps']} steps per context, "
                    f"{sft['train_seconds']:.1f} s of training in all"
                )
            notes += [f"{row['name']}: {note}" for note in row.get("notes", [])]
    return "\n".join(text + notes)


def _align(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return text


def _methods(rows: list[dict]) -> list[str]:
    """The methods of a suite's rows: the usual ones in their order, then any others as given."""
    names = list(dict.fromkeys(k for row in rows for k in row["methods"]))
    return [k for k in METHOD_ORDER if k in names] + [k for k in names if k not in METHOD_ORDER]


def write_json(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(results, indent=1).encode())
    return path


def write_charts(results: dict, folder: Path) -> list[Path]:
    """One PNG per suite: each method's score on every metric of every row, as grouped bars; a
    suite with methods of its own (vocab, library) gets one PNG per headline metric,
    SUITE-METRIC.png, with the rows of that metric (library: one group per library size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    charts = []
    for suite, rows in results["suites"].items():
        if any(n not in METHOD_ORDER for n in _methods(rows)):  # one chart per headline metric
            for metric in dict.fromkeys(row["metric"] for row in rows):
                charts.append((f"{suite}-{metric}", [r for r in rows if r["metric"] == metric]))
        elif rows:
            charts.append((suite, rows))
    used = {tuple(round(c * 255) for c in matplotlib.colors.to_rgb(v)) for v in COLOURS.values()}
    palette = [
        c for c in plt.get_cmap("tab20").colors if tuple(round(x * 255) for x in c) not in used
    ]
    for suite, rows in charts:
        groups = [(row, metric) for row in rows for metric in row["metrics"]]
        methods = _methods(rows)
        fig, ax = plt.subplots(figsize=(1.8 + 0.45 * len(groups) * len(methods), 3.4))
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
            ys = [row["methods"].get(method, {}).get(metric, 0.0) for row, metric in groups]
            colour = COLOURS.get(method, palette[j % len(palette)])
            ax.bar(xs, ys, width, label=method, color=colour)
            for x, y in zip(xs, ys):
                ax.text(x, y, _cell(y), ha="center", va="bottom", fontsize=6)
        labels = [
            metric if len(rows) == 1 else f"{row['name']}\n{metric}" for row, metric in groups
        ]
        ax.set_xticks(range(len(groups)), labels, fontsize=8)
        if rows[0]["higher_is_better"]:
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("score (higher is better)")
        else:
            ax.set_ylabel(f"{rows[0]['metric']} (lower is better)")
        n = sum(r["n"] for r in rows)
        ax.set_title(f"{suite}: {n} items, limit {results['config']['limit']}", fontsize=9)
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        path = folder / f"{suite}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
