"""twml: trustworthy-ML studies on timm models, tracked in MLflow.

The public Python API:

    from twml_cli import load_dataset, load_model
    train, test = load_dataset("digits")        # TensorDatasets of [0, 1] images, int labels
    model = load_model("<run id>")              # or runs:/<id>/model, or a local folder

Both import lazily, so `import twml_cli` is cheap and needs neither torch nor MLflow.
"""

__version__ = "0.1.0"
__all__ = ["load_dataset", "load_model", "__version__"]


def __getattr__(name: str):
    if name == "load_dataset":
        from .data import load_dataset

        return load_dataset
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'twml_cli' has no attribute '{name}'")
