"""Figures and images the studies log and the report embeds (matplotlib, Pillow; no MLflow)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

MIN_IMAGE_SIDE = 160  # pixels: an 8x8 mask is upscaled 20x with nearest neighbour


def save(fig, path: str | Path) -> Path:
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_both(fig, stem: str | Path, close: bool = True) -> tuple[Path, Path]:
    """The figure as stem.png and stem.pdf (a write-up wants the PDF, a browser the PNG)."""
    paths = Path(f"{stem}.png"), Path(f"{stem}.pdf")
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    if close:
        plt.close(fig)
    return paths


def _as_array(t: torch.Tensor) -> np.ndarray:
    """A [0, 1] image (H, W) or (C, H, W) as an (H, W) or (H, W, C) array."""
    a = t.detach().float().cpu().clamp(0, 1).numpy()
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    return a


def to_image(t: torch.Tensor) -> Image.Image:
    """A [0, 1] image as a PNG-ready image, upscaled with nearest neighbour so small images
    stay crisp and visible."""
    img = Image.fromarray((_as_array(t) * 255).round().astype(np.uint8))
    scale = max(1, -(-MIN_IMAGE_SIDE // min(img.size)))
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def save_image(t: torch.Tensor, path: str | Path) -> Path:
    to_image(t).save(path)
    return Path(path)


def _show(ax, t: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(_as_array(t), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _accuracy_axes(ax, xlabel: str, ylabel: str) -> None:
    """An accuracy (0 to 1) against a budget or radius (from 0), with a light grid."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)


def certified_accuracy_figure(curves: dict[float, tuple[np.ndarray, np.ndarray]]):
    """Certified accuracy against certified L2 radius, one curve per sigma."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for sigma, (radii, acc) in sorted(curves.items()):
        ax.plot(radii, acc, label=f"{sigma:g}", linewidth=2)
    _accuracy_axes(ax, "L2 radius (pixels in [0, 1])", "certified accuracy")
    ax.legend(title="σ")
    ax.set_title("Randomized smoothing: certified accuracy vs radius")
    return fig


def filter_tradeoff_figure(clean: np.ndarray, stamped: dict[str, np.ndarray], threshold: float):
    """An input filter's trade-off: for every threshold on its profile (the mean activation of its
    neurons), the share of clean images it rejects against the share of each kind of stamped
    image (`stamped`: label -> profiles); the threshold chosen is marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    right = max(0.2, 2.5 * float((clean > threshold).mean()))  # the low rejection of clean images, where it matters
    for label, values in stamped.items():
        cuts = np.unique(np.concatenate([clean, values, [np.inf]]))[::-1]  # from rejecting none to rejecting all
        x = np.array([(clean > t).mean() for t in cuts] + [1.0])
        y = np.array([(values > t).mean() for t in cuts] + [1.0])
        (line,) = ax.plot(x, y, label=label, linewidth=2)
        ax.plot([(clean > threshold).mean()], [(values > threshold).mean()], "o", color=line.get_color())
        right = max(right, float(x[np.argmax(y >= 0.99)]))  # until every curve rejects 99%
    ax.plot([], [], "o", color="0.4", label=f"the threshold chosen ({threshold:.4g})")
    _accuracy_axes(ax, "clean test images rejected", "stamped test images rejected")
    ax.set_xlim(0, min(1.0, right))
    ax.legend(loc="lower right")
    ax.set_title("Input filter: what each threshold rejects")
    return fig


def adversarial_bars_figure(labels: list[str], accuracy: list[float], pgd_success: list[float]):
    """Benign accuracy and PGD success rate side by side for each training run."""
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels) + 1.5), 3.4))
    ax.bar(x - 0.2, accuracy, 0.4, label="benign accuracy", color="tab:blue")
    ax.bar(x + 0.2, pgd_success, 0.4, label="PGD success rate", color="tab:red")
    for xi, a, s in zip(x, accuracy, pgd_success):
        ax.text(xi - 0.2, a + 0.01, f"{a:.3f}", ha="center", fontsize=7)
        ax.text(xi + 0.2, s + 0.01, f"{s:.3f}", ha="center", fontsize=7)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.legend(fontsize=8, loc="upper center", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def example_figure(clean: torch.Tensor, triggered: torch.Tensor, label: int, target: int):
    """A clean training image beside its triggered copy."""
    fig, axes = plt.subplots(1, 2, figsize=(4, 2.3))
    _show(axes[0], clean, f"clean (label {label})")
    _show(axes[1], triggered, f"triggered (label {target})")
    return fig


def norms_figure(models: list[dict]):
    """One bar chart per model: the L1 norm of each class's reversed mask, the median and
    the detection threshold (median - threshold * 1.4826 MAD: an anomaly index of `threshold`);
    flagged classes in red. Each dict has keys name, norms, median, mad (already scaled by
    1.4826), threshold, flagged. The legend sits above the bars, where it covers none."""
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        norms = np.asarray(m["norms"])
        colors = ["tab:red" if f else "tab:blue" for f in m["flagged"]]
        ax.bar(np.arange(len(norms)), norms, color=colors)
        ax.axhline(m["median"], color="black", linestyle="--", linewidth=1, label="median")
        cut = m["median"] - m["threshold"] * m["mad"]
        if cut > 0:
            ax.axhline(
                cut, color="tab:red", linestyle=":", linewidth=1.5, label=f"median - {m['threshold']:g} x 1.4826 MAD"
            )
        else:  # the threshold lies below a norm of 0: the plot cannot show it, so it says so
            ax.plot([], [], " ", label="threshold < 0: no class can be flagged")
        ax.set_xticks(np.arange(len(norms)))
        ax.set_xlabel("target class")
        ax.set_ylabel("L1 norm of mask")
        ax.set_title(m["name"], fontsize=10, pad=22)
        ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def mask_grid_figure(models: list[dict]):
    """Masks and triggers (mask * pattern) of every class of every model: two rows a model.
    Each dict has keys name, masks (K, H, W), patterns (K, C, H, W), flagged."""
    k = max(len(m["masks"]) for m in models)
    fig, axes = plt.subplots(2 * len(models), k, figsize=(1.1 * k, 2.4 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        for c in range(k):
            for r, what in enumerate(("mask", "trigger")):
                ax = axes[2 * i + r, c]
                if c >= len(m["masks"]):
                    ax.axis("off")
                    continue
                img = m["masks"][c] if what == "mask" else m["masks"][c] * m["patterns"][c]
                _show(ax, img, f"{c}" if r == 0 else None)
                if m["flagged"][c]:
                    for spine in ax.spines.values():
                        spine.set_edgecolor("tab:red")
                        spine.set_linewidth(2.5)
        axes[2 * i, 0].set_ylabel(f"{m['name']}\nmask", fontsize=8)
        axes[2 * i + 1, 0].set_ylabel("trigger", fontsize=8)
    fig.suptitle("Reversed masks and triggers per class (red: flagged)", fontsize=10)
    fig.tight_layout()
    return fig


def sweep_figure(agg, groups: list[str], metrics: list[str], labels: dict[str, str], title: str):
    """A sweep's aggregate: one panel per metric, mean over seeds with standard-deviation error
    bars. The first swept setting is the x-axis (categorical unless numeric); a second one
    draws one line per value; further ones are folded into the x labels."""
    x_key = groups[0] if groups else None
    line_key = groups[1] if len(groups) == 2 else None
    fold = groups[2:] if len(groups) > 2 else []
    if fold:  # three or more swept settings: one categorical axis of every combination but the lines'
        x_key, line_key = None, groups[1]
    if any(agg[k].isna().any() for k in groups):  # a setting some cells lack (standard has no m): one point each
        x_key, line_key = None, None
    n_seeds = int(agg[f"{metrics[0]}_n"].max()) if metrics else 0
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics) + 0.6, 3.2), squeeze=False)
    lines = list(dict.fromkeys(agg[line_key])) if line_key else [None]
    numeric_x = x_key is not None and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in agg[x_key]
    )
    categories = list(dict.fromkeys(_x_label(r, groups, line_key) for _, r in agg.iterrows())) if not numeric_x else []
    for ax, metric in zip(axes[0], metrics):
        for j, value in enumerate(lines):
            part = agg if line_key is None else agg[agg[line_key] == value]
            part = part[part[f"{metric}_mean"].notna()]
            if part.empty:
                continue
            xs = (
                part[x_key].to_numpy(dtype=float)
                if numeric_x
                else np.array([categories.index(_x_label(r, groups, line_key)) for _, r in part.iterrows()])
            )
            order = np.argsort(xs, kind="stable")
            offset = 0 if numeric_x or len(lines) == 1 else (j - (len(lines) - 1) / 2) * 0.08
            ax.errorbar(
                xs[order] + offset,
                part[f"{metric}_mean"].to_numpy()[order],
                yerr=part[f"{metric}_std"].to_numpy()[order],
                marker="o",
                capsize=3,
                linewidth=1.5,
                linestyle="-" if numeric_x else "none",  # no trend between categories (standard, free m=4, ...)
                label=None if value is None else f"{line_key}={value}",
            )
        ax.set_title(labels.get(metric, metric), fontsize=9)
        ax.grid(alpha=0.3)
        if numeric_x:
            ax.set_xlabel(x_key)
            values = sorted(set(agg[x_key].to_numpy(dtype=float)))
            if len(values) <= 8:
                ax.set_xticks(values, [f"{v:g}" for v in values])
        else:
            ax.set_xticks(
                range(len(categories)),
                categories,
                fontsize=8,
                rotation=30 if len(categories) > 3 else 0,
                ha="right" if len(categories) > 3 else "center",
            )
            ax.set_xlim(-0.5, len(categories) - 0.5)
        if metric.endswith("accuracy") or metric.endswith("rate") or metric.startswith("certified_accuracy"):
            low = float(np.nanmin(agg[f"{metric}_mean"] - agg[f"{metric}_std"]))
            ax.set_ylim(max(0.0, min(low - 0.05, 0.9)), 1.0 + 0.02)
    if line_key is not None:
        axes[0][-1].legend(fontsize=7, loc="best")
    seeds = f"mean ± sd over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    fig.suptitle(f"{title} ({seeds})", fontsize=10)
    fig.tight_layout()
    return fig


def _x_label(row, groups: list[str], line_key: str | None) -> str:
    """A category's label: a lone setting's value ('free'), else each value that the cell has, a
    number with its name ('free m=4', 'standard')."""
    keys = [k for k in groups if k != line_key and pd.notna(row[k])]

    def value(v) -> str:
        return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)

    if len(keys) == 1:
        return value(row[keys[0]])
    return " ".join(row[k] if isinstance(row[k], str) else f"{k}={value(row[k])}" for k in keys)


def over_seeds(counts, noun: str = "seeds") -> str:
    """'one seed', 'mean ± sd over 3 seeds', or 'mean ± sd over 1 to 3 seeds' where the points of a
    figure rest on different numbers of seeds."""
    lo, hi = min(counts), max(counts)
    if hi <= 1:
        return "one seed"
    return f"mean ± sd over {hi if lo == hi else f'{lo} to {hi}'} {noun}"


def certified_accuracy_bands_figure(radii: np.ndarray, curves: dict, envelope: np.ndarray):
    """Certified accuracy against radius for each cell of a smoothing sweep: the mean over seeds
    with a band of one standard deviation, each cell's ACR in the legend, and the envelope.
    `curves`: name -> studies.smooth.Band."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, c in curves.items():
        spread = f" ± {c.acr_sd:.3f}" if c.seeds > 1 else ""
        (line,) = ax.plot(radii, c.mean, linewidth=1.8, label=f"{name} (ACR {c.acr:.3f}{spread})")
        if c.seeds > 1:
            ax.fill_between(
                radii,
                np.clip(c.mean - c.sd, 0, 1),
                np.clip(c.mean + c.sd, 0, 1),
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    if len(curves) > 1:
        ax.plot(radii, envelope, color="black", linestyle="--", linewidth=1.2, label="envelope (best at each radius)")
    _accuracy_axes(ax, "L2 radius (pixels in [0, 1])", "certified accuracy")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"Certified accuracy vs radius ({over_seeds([c.seeds for c in curves.values()])})", fontsize=10)
    return fig


def robustness_curves_figure(table):
    """Robust accuracy against eps, one colour per model (curve), PGD solid with circles and
    AutoAttack dashed with squares (a short legend handle hides the dashes), with the standard
    deviation over replicates (seeds) as error bars and each curve's normalized area in the
    legend. `table`: studies.attack.curves' rows."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {}
    for (curve, attack), part in table.groupby(["curve", "attack"], sort=False):
        colour = colours.setdefault(curve, f"C{len(colours)}")
        ax.errorbar(
            part["eps"],
            part["robust_accuracy_mean"],
            yerr=part["robust_accuracy_sd"],
            color=colour,
            marker="o" if attack == "pgd" else "s",
            markersize=4,
            capsize=3,
            linestyle="-" if attack == "pgd" else "--",
            label=f"{curve}, {'PGD' if attack == 'pgd' else 'AutoAttack'} (AUC {part['auc'].iloc[0]:.3f})",
        )
    _accuracy_axes(ax, "eps (L-inf, pixels in [0, 1])", "robust accuracy")
    ax.legend(fontsize=7, loc="upper right", handlelength=3.5)
    ax.set_title(
        f"Robust accuracy vs eps ({over_seeds(table['replicates'].astype(int), 'replicates')}; eps 0: clean accuracy)",
        fontsize=9,
    )
    return fig


def m_curve_figure(
    m: np.ndarray,
    means: dict[str, np.ndarray],
    sds: dict[str, np.ndarray],
    refs: dict[str, dict[str, tuple[float, float]]],
    labels: dict[str, str],
    seeds: list[int],
):
    """Free adversarial training against m: one panel per metric, mean ± sd over seeds (`seeds`:
    how many at each m), with other methods (standard, fast) as horizontal references (a band of
    one sd)."""
    metrics = list(means)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 0.6, 3.3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ax.errorbar(
            m, means[metric], yerr=sds[metric], marker="o", capsize=3, linewidth=1.8, color="tab:blue", label="free"
        )
        for k, (name, values) in enumerate(refs.items()):
            if metric not in values:
                continue
            mean, sd = values[metric]
            colour = f"C{k + 1}"
            ax.axhline(mean, color=colour, linestyle="--", linewidth=1.2, label=name)
            ax.axhspan(mean - sd, mean + sd, color=colour, alpha=0.12, linewidth=0)
        ax.set_xticks(m, [f"{v:g}" for v in m])
        ax.set_xlabel("m (replays per minibatch)")
        ax.set_title(labels.get(metric, metric), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(
        f"Free adversarial training against m ({over_seeds(seeds)})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
