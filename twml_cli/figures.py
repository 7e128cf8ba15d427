"""Figures and images the studies log and the report embeds (matplotlib, Pillow; no MLflow)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_image(t: torch.Tensor, path: str | Path) -> Path:
    to_image(t).save(path)
    return Path(path)


def _show(ax, t: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(_as_array(t), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def certified_accuracy_figure(curves: dict[float, tuple[np.ndarray, np.ndarray]]):
    """Certified accuracy against certified L2 radius, one curve per sigma."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for sigma, (radii, acc) in sorted(curves.items()):
        ax.plot(radii, acc, label=f"{sigma:g}", linewidth=2)
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(title="σ")
    ax.set_title("Randomized smoothing: certified accuracy vs radius")
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
    the detection threshold (median - threshold * MAD); flagged classes in red.
    Each dict has keys name, norms, median, mad, threshold, flagged."""
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.4), squeeze=False)
    for ax, m in zip(axes[0], models):
        norms = np.asarray(m["norms"])
        colors = ["tab:red" if f else "tab:blue" for f in m["flagged"]]
        ax.bar(np.arange(len(norms)), norms, color=colors)
        ax.axhline(m["median"], color="black", linestyle="--", linewidth=1, label="median")
        cut = m["median"] - m["threshold"] * m["mad"]
        if cut > 0:
            ax.axhline(cut, color="tab:red", linestyle=":", linewidth=1.5, label=f"median - {m['threshold']:g} MAD")
        ax.set_xticks(np.arange(len(norms)))
        ax.set_xlabel("target class")
        ax.set_ylabel("L1 norm of mask")
        ax.set_title(m["name"], fontsize=10)
        ax.legend(fontsize=8)
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
