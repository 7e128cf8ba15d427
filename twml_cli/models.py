"""timm backbones that take [0, 1] input: normalization inside the model, a small-input stem,
weights as safetensors beside a JSON spec (never pickle).

    spec = ModelSpec.for_data("resnet18", info)      # info: data.DataInfo
    model = create_model(spec)                       # nn.Module: [0, 1] images -> logits
    save_model(model, "out/model")                   # model.safetensors + spec.json
    model = load_model_dir("out/model")              # twml_cli.load_model also takes run ids
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import torch
from torch import nn

from .configs import check_model_kwargs
from .errors import TwmlError

M = TypeVar("M", bound=nn.Module)

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.json"
SMALL_INPUT = 64  # below this many pixels a side, the stem keeps full resolution


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model before its weights are loaded."""

    arch: str
    num_classes: int
    in_chans: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_kwargs: dict = field(default_factory=dict)
    small_input_stem: bool = True
    dataset: str = ""  # the data set it was made for (provenance; not needed to load it)

    @classmethod
    def for_data(cls, arch: str, info, model_kwargs: dict | None = None, stem: str = "auto") -> ModelSpec:
        """The spec of `arch` for data set `info`. stem: 'auto' (the small-input stem below
        SMALL_INPUT pixels), 'small' or 'timm' (the architecture's own)."""
        return cls(
            arch=arch,
            num_classes=info.num_classes,
            in_chans=info.in_chans,
            input_size=tuple(info.input_size),
            mean=tuple(info.mean),
            std=tuple(info.std),
            model_kwargs=dict(model_kwargs or {}),
            small_input_stem=stem == "small" or (stem == "auto" and min(info.input_size) < SMALL_INPUT),
            dataset=info.name,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        raw = json.loads(text)
        raw["input_size"] = tuple(raw["input_size"])
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        return cls(**raw)


class Normalize(nn.Module):
    """(x - mean) / std per channel; the first layer, so the model takes [0, 1] pixels."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A timm backbone behind a Normalize layer: [0, 1] images in, logits out."""

    def __init__(self, spec: ModelSpec, backbone: nn.Module):
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def check_arch(arch: str) -> None:
    """A TwmlError unless timm knows the architecture `arch`."""
    import timm

    if not timm.is_model(arch):
        raise TwmlError(f"unknown model '{arch}': use a timm architecture name (see timm.list_models()), e.g. resnet18")


def create_model(spec: ModelSpec) -> Classifier:
    """A freshly initialized model (no pretrained weights: nothing is downloaded)."""
    import timm

    check_arch(spec.arch)
    check_model_kwargs(spec.model_kwargs)
    try:
        backbone = timm.create_model(
            spec.arch, pretrained=False, num_classes=spec.num_classes, in_chans=spec.in_chans, **spec.model_kwargs
        )
    except (TypeError, ValueError, AssertionError) as err:  # an unknown argument, or a value the model refuses
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TwmlError(
            f"model '{spec.arch}' does not take these --model-kwargs {spec.model_kwargs}: {first}"
        ) from None
    if spec.small_input_stem:
        adapt_stem(backbone)
    model = Classifier(spec, backbone).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, spec.in_chans, *spec.input_size))
    except Exception as err:  # noqa: BLE001 - any failure here means the architecture does not fit the data
        size = "x".join(map(str, (spec.in_chans, *spec.input_size)))
        raise TwmlError(
            f"model '{spec.arch}' cannot take {size} inputs ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            f"choose a convolutional model or pass --model-kwargs (e.g. img_size/patch_size for a ViT)"
        ) from None
    return model


def adapt_stem(backbone: nn.Module) -> bool:
    """The usual CIFAR adaptation: the stem's stride-2 convolution becomes 3x3 stride 1 and a
    stem max-pool is dropped, so small images keep their resolution. Returns whether it
    changed anything. Patch embeddings (ViTs) are left alone."""
    first = (getattr(backbone, "pretrained_cfg", None) or {}).get("first_conv")
    if not first or "patch_embed" in first:
        return False
    conv = backbone.get_submodule(first)
    if not isinstance(conv, nn.Conv2d) or conv.stride == (1, 1) or conv.groups != 1:
        return False
    _set_submodule(
        backbone,
        first,
        nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None),
    )
    for name, module in list(backbone.named_modules()):
        if isinstance(module, nn.MaxPool2d) and (name == "maxpool" or name.startswith("stem.")):
            _set_submodule(backbone, name, nn.Identity())
    return True


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def prepare(model: M, device: torch.device) -> M:
    """Move to the device, channels_last (see runtime.to_device_layout). On CUDA, cuDNN
    autotunes its convolutions: every study feeds fixed-size batches."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model.to(device).to(memory_format=torch.channels_last)


def compiled(model: nn.Module, mode: str | None) -> nn.Module:
    """The model compiled with torch.compile (mode 'default' or 'reduce-overhead': CUDA
    graphs), or the model itself when mode is None. Weights are shared."""
    if not mode:
        return model
    return cast(nn.Module, torch.compile(model, mode=None if mode == "default" else mode))


def is_compiled(model: nn.Module) -> bool:
    """Whether `model` is what compiled() returns for a mode (torch.compile's wrapper keeps the
    model it wraps as _orig_mod)."""
    return hasattr(model, "_orig_mod")


# ---------------------------------------------------------------- save / load


def save_model(model: Classifier, folder: str | Path) -> Path:
    """Write model.safetensors and spec.json into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "arch": model.spec.arch})
    (folder / SPEC_FILE).write_text(model.spec.to_json())
    return folder


def load_model_dir(folder: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Rebuild a model from spec.json and model.safetensors; reads nothing else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_path, weights = folder / SPEC_FILE, folder / WEIGHTS_FILE
    if not spec_path.is_file() or not weights.is_file():
        raise TwmlError(f"'{folder}' holds no model (need {SPEC_FILE} and {WEIGHTS_FILE})")
    try:
        spec = ModelSpec.from_json(spec_path.read_text())
    except (ValueError, TypeError, KeyError) as err:
        raise TwmlError(f"{spec_path}: not a valid model spec ({err})") from None
    model = create_model(spec)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise TwmlError(f"{weights}: not a readable safetensors file ({err})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TwmlError(
            f"{weights}: weights do not fit the {spec.arch} in {SPEC_FILE} ({str(err).splitlines()[0]})"
        ) from None
    return prepare(model, torch.device(device)).eval()
