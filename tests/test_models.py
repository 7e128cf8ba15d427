import json

import pytest
import torch
from torch import nn

from twml_cli import load_model
from twml_cli.errors import TwmlError
from twml_cli.models import ModelSpec, create_model, load_model_dir, prepare, save_model


def spec_for(arch, chans=1, size=8, classes=10, **kwargs):
    return ModelSpec(arch, classes, chans, (size, size), (0.3,) * chans, (0.4,) * chans, kwargs, size < 64, "test")


@pytest.mark.parametrize("arch", ["test_byobnet", "test_resnet", "test_efficientnet", "test_convnext"])
@pytest.mark.parametrize("size", [8, 32])
def test_tiny_timm_models_take_small_inputs_with_a_stride_1_stem(arch, size):
    model = create_model(spec_for(arch, chans=3, size=size))
    first = model.backbone.get_submodule(model.backbone.pretrained_cfg["first_conv"])
    assert first.stride == (1, 1) and first.kernel_size == (3, 3)
    assert not any(
        isinstance(m, nn.MaxPool2d)
        for name, m in model.backbone.named_modules()
        if name == "maxpool" or name.startswith("stem.")
    )
    assert model(torch.rand(2, 3, size, size)).shape == (2, 10)


def test_large_inputs_keep_the_original_stem():
    model = create_model(spec_for("test_resnet", chans=3, size=64))
    assert model.backbone.conv1[0].stride == (2, 2)


def test_model_kwargs_reach_timm():
    model = create_model(spec_for("resnet18", channels=(8, 16, 32, 64), stem_width=8))
    assert model.backbone.fc.in_features == 64


def test_normalization_is_the_first_layer():
    model = create_model(spec_for("test_byobnet")).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), model.backbone((x - 0.3) / 0.4), atol=1e-6)


def test_saved_model_loads_back_with_identical_outputs(tmp_path):
    model = prepare(create_model(spec_for("test_byobnet")), torch.device("cpu"))  # as twml trains it
    model.train()
    model(torch.rand(16, 1, 8, 8))  # move the BatchNorm running statistics away from their init
    model.eval()
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "spec.json"]
    loaded = load_model(tmp_path)
    assert not loaded.training
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert json.loads((tmp_path / "spec.json").read_text())["arch"] == "test_byobnet"


def test_unknown_architecture_and_misfit_inputs_are_refused():
    with pytest.raises(TwmlError, match="unknown model 'resnet_nonexistent'"):
        create_model(spec_for("resnet_nonexistent"))
    with pytest.raises(TwmlError, match="cannot take 1x8x8 inputs"):
        create_model(spec_for("test_vit"))


def test_weights_that_are_not_safetensors_are_refused(tmp_path):
    save_model(create_model(spec_for("test_byobnet")), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04 this is a pickle, not safetensors")
    with pytest.raises(TwmlError, match="not a readable safetensors file"):
        load_model_dir(tmp_path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_model(create_model(spec_for("test_byobnet")), tmp_path)
    spec = json.loads((tmp_path / "spec.json").read_text())
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "arch": "test_resnet"}))
    with pytest.raises(TwmlError, match="do not fit the test_resnet"):
        load_model_dir(tmp_path)


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(TwmlError, match="holds no model"):
        load_model_dir(tmp_path)


def test_a_compiled_model_is_recognised_as_one():
    """Certification runs a compiled model's batches one after another (smoothing._counts)."""
    from torch import nn

    from twml_cli.models import compiled, is_compiled

    model = nn.Linear(2, 2)
    assert not is_compiled(model) and not is_compiled(compiled(model, None))
    assert is_compiled(compiled(model, "default"))  # torch.compile wraps lazily: nothing compiles here
