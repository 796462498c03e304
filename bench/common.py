"""What every benchmark does alike: describe the hardware, compare with the previous run's
JSON, draw and save the chart, and state a goal as a record.

Charts follow two rules: a log x-axis where bytes span orders of magnitude (methods differ by
100x and more in what they send), and the legend outside the data, so no curve hides under
it."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def hardware() -> dict[str, Any]:
    """Where the numbers were measured; a benchmark adds what else matters to it."""
    import torch

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def previous_results(path: Path, key: Callable[[dict], Hashable]
                     ) -> tuple[dict[str, Any], dict[Hashable, dict]] | None:
    """The previous report at ``path`` and its ``results`` rows by ``key``; None (and a note)
    when there is none or it cannot be read."""
    if not path.exists():
        print("  (no previous run to compare with)")
        return None
    try:
        report = json.loads(path.read_text())
        return report, {key(r): r for r in report["results"]}
    except (ValueError, KeyError, TypeError):
        return None


def goal_record(goal: str, target: float, measured: float | None, met: bool | None, text: str,
                **details: Any) -> dict[str, Any]:
    """A benchmark's goal as its JSON states it: what, the target, the measurement, whether
    it was met (None: not measured) and a sentence for the reader."""
    return {"goal": goal, "target": target, "measured": measured, "met": met, "text": text,
            **details}


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend_outside(ax, **kwargs: Any) -> None:
    """The legend to the right of the axes, outside the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              fontsize=kwargs.pop("fontsize", 8), **kwargs)


def save_figure(fig, path: Path) -> None:
    """Lay out (legends outside included), write the PNG, free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
