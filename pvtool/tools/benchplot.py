"""`pvtool bench --plot FILE`: exits by reason and time, per kernel and mode, as an SVG or PNG.

One row of two panels per kernel: on the left, each mode's exits as a bar
stacked by reason (the most frequent reasons, the rest as "other"); on the
right, each mode's run time stacked as guest and hypervisor time, the
loading (the same work in every mode, and often longer) written beside it.  Drawing is matplotlib's, an optional extra
(`pip install 'pvtool[plot]'`); `available()` says whether it is installed,
so the command can refuse `--plot` before it measures anything.  Every bar
carries an id (`exits:KERNEL:MODE:REASON`, `time:KERNEL:MODE:PART`), which
an SVG keeps, so the picture can be checked by its structure.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .bench import Row

SUFFIXES = (".svg", ".png")
INSTALL_HINT = "pip install 'pvtool[plot]' (or: pip install matplotlib)"
TOP_REASONS = 6                     # reasons drawn apart per kernel; the others are summed as "other"
TIME_PARTS = ("guest", "hypervisor")


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def reasons_drawn(rows: list[Row]) -> list[str]:
    """One kernel's reasons to draw apart: the most frequent over all its modes."""
    totals: dict[str, int] = {}
    for r in rows:
        for why, n in r.exits_by_reason.items():
            totals[why] = totals.get(why, 0) + n
    return sorted(totals, key=lambda why: -totals[why])[:TOP_REASONS]


def segments(row: Row, drawn: list[str]) -> list[tuple[str, int]]:
    """The exit bar of one row: (reason, exits) for each drawn reason, then "other"."""
    parts = [(why, row.exits_by_reason.get(why, 0)) for why in drawn]
    other = row.exits - sum(n for _, n in parts)
    return parts + ([("other", other)] if other else [])


def plot(rows: list[Row], path: Path) -> None:
    """Draw the figure into `path` (its suffix picks SVG or PNG); OSError if it cannot be written."""
    import matplotlib
    matplotlib.use("Agg")                      # files only: never a window
    import matplotlib.pyplot as plt

    kernels = list(dict.fromkeys(r.kernel for r in rows))
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "pvtool"}):
        fig, axes = plt.subplots(len(kernels), 2, figsize=(14, 1.2 + 2.0 * len(kernels)), squeeze=False)
        colours = plt.get_cmap("tab10").colors
        for (exits_ax, time_ax), kernel in zip(axes, kernels):
            mine = [r for r in rows if r.kernel == kernel]
            _exits_panel(exits_ax, kernel, mine, colours)
            _time_panel(time_ax, kernel, mine, colours)
        fig.suptitle("pvtool bench: exits by reason and time, per kernel and mode")
        fig.tight_layout()
        fig.savefig(path, format=path.suffix[1:], metadata=_metadata(path))
        plt.close(fig)


def _metadata(path: Path) -> dict:
    return {"Date": None} if path.suffix == ".svg" else {}     # reproducible SVGs


def _exits_panel(ax, kernel: str, rows: list[Row], colours) -> None:
    drawn = reasons_drawn(rows)
    colour = {why: colours[i % len(colours)] for i, why in enumerate(drawn + ["other"])}
    modes = [r.mode for r in rows]
    for y, r in enumerate(rows):
        left = 0
        for why, n in segments(r, drawn):
            if n:
                ax.barh(y, n, left=left, color=colour[why], label=why, gid=f"exits:{kernel}:{r.mode}:{why}")
                left += n
        ax.text(left, y, f" {r.exits:,}", va="center", fontsize=8)
    _room_for_labels(ax, max(r.exits for r in rows))
    ax.set_yticks(range(len(rows)), modes)
    ax.invert_yaxis()
    ax.set_xlabel("exits per run")
    ax.set_title(f"{kernel}: exits by reason")
    _legend(ax)


def _time_panel(ax, kernel: str, rows: list[Row], colours) -> None:
    colour = dict(zip(TIME_PARTS, (colours[0], colours[3])))
    for y, r in enumerate(rows):
        left = 0.0
        for part, seconds in zip(TIME_PARTS, (r.guest_seconds, r.hypervisor_seconds)):
            ax.barh(y, seconds * 1e3, left=left, color=colour[part], label=part, gid=f"time:{kernel}:{r.mode}:{part}")
            left += seconds * 1e3
        ax.text(left, y, f" load {r.load_seconds * 1e3:.0f} ms", va="center", fontsize=8)
    _room_for_labels(ax, max((r.guest_seconds + r.hypervisor_seconds) * 1e3 for r in rows))
    ax.set_yticks(range(len(rows)), [r.mode for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per run, without loading (medians)")
    ax.set_title(f"{kernel}: guest and hypervisor time")
    _legend(ax)


def _room_for_labels(ax, longest: float) -> None:
    """Leave room right of the longest bar for the figure written after it."""
    ax.set_xlim(0, longest * 1.25 or 1)


def _legend(ax) -> None:
    """One legend entry per label, however many bars carry it."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
