"""twml: trustworthy-ML studies on timm models, tracked in MLflow.

The public Python API:

    from twml_cli import load_dataset, load_model
    train, test = load_dataset("digits")        # TensorDatasets of [0, 1] images, int labels
    model = load_model("<run id>")              # or runs:/<id>/model, or a local folder

Both import lazily, so `import twml_cli` is cheap and needs neither torch nor MLflow.
"""

from __future__ import annotations

from .version import __version__

__all__ = ["load_dataset", "load_model", "__version__"]


def load_model(uri, device="cpu"):
    """A model in eval mode that takes [0, 1] images: from a local folder (model.safetensors
    and spec.json; no MLflow needed), a run id or a ``runs:/<id>/model`` URI (through MLflow)."""
    from pathlib import Path

    if Path(uri).is_dir():
        from .models import load_model_dir

        return load_model_dir(uri, device)
    from .tracking import load_model as load_logged

    return load_logged(str(uri), device)


def __getattr__(name: str):
    if name == "load_dataset":
        from .data import load_dataset

        return load_dataset
    raise AttributeError(f"module 'twml_cli' has no attribute '{name}'")
