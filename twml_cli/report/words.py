"""Numbers into words: the write-up's sentences are computed, never typed in."""

from __future__ import annotations

from pathlib import Path

from .. import results


def f4(v: float) -> str:
    return f"{v:.4f}"


def secs(v: float) -> str:
    return f"{v:.1f} s"


def change(before: float, after: float, fmt=f4, points: bool = True) -> str:
    """'rose from A to B (+d points)', 'fell from ...', or 'stayed at A' where A and B print alike
    (a ratio, as 'x1.01', is still given: it has more digits than the figures)."""
    ratio = f" (x{after / before:.2f})" if before and not points else ""
    if fmt(after) == fmt(before):
        return f"stayed at {fmt(before)}{ratio if ratio != ' (x1.00)' else ''}"
    verb = "rose" if after > before else "fell"
    delta = f" ({(after - before) * 100:+.2f} points)" if points else ratio
    return f"{verb} from {fmt(before)} to {fmt(after)}{delta}"


def count(n: int, noun: str) -> str:
    """'1 pixel', '4 pixels'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def short(run_id: str) -> str:
    return run_id[:8]


def model_name(source: str) -> str:
    """How the write-up names a model a study read: 'run be5a1e18' for a run id (or a runs:/ URI),
    a registered model's models:/ URI as given, else 'folder <its name>'."""
    run = results.run_in(source)
    if run:
        return f"run {run[:8]}"
    if source.startswith("models:/"):
        return source
    return f"folder {Path(source).name}"
