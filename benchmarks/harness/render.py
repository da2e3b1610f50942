"""Outputs every study writes: results.json, a markdown table, a PNG with legible type."""
from __future__ import annotations

from pathlib import Path

from .records import write_json

#: type sizes (points) of every benchmark figure: nothing below 9 pt
STYLE = {"font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "legend.fontsize": 9,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.titlesize": 12, "legend.title_fontsize": 9}


def pyplot():
    """matplotlib.pyplot on the Agg backend with the benchmark type sizes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update(STYLE)
    return plt


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(x, spec: str = ".1f", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def pct(x, none: str = "—") -> str:
    return none if x is None else f"{100 * x:.1f} %"


def table(header: list[str], rows) -> list[str]:
    """A markdown table (header, separator, one line per row of cells)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_report(out: Path, stem: str, result, markdown, plot=None) -> None:
    """OUT/<stem>.md and OUT/<stem>.png only: ``--report-only`` redraws from the numbers without
    rewriting them; a failing plot is reported and loses no table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(markdown(result)) + "\n")
    if plot is not None:
        try:
            plot(result, out / f"{stem}.png")
        except Exception as exc:      # a missing matplotlib must not lose the numbers
            print(f"plot failed: {type(exc).__name__}: {exc}", flush=True)


def write_outputs(out: Path, stem: str, result, markdown, plot=None) -> None:
    """OUT/results.json (every number), OUT/<stem>.md (`markdown(result)` lines) and OUT/<stem>.png
    (`plot(result, path)`); a failing plot is reported and loses no numbers."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    write_report(out, stem, result, markdown, plot)
