import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from twml_cli.data import describe, load_dataset
from twml_cli.errors import TwmlError


def test_digits_is_a_fixed_stratified_split_of_all_1797_images(digits):
    train, test, info = digits.train, digits.test, digits.info
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 == min(x_train.min(), x_test.min()) and max(x_train.max(), x_test.max()) == 1.0
    assert info.num_classes == 10 and info.in_chans == 1 and info.input_size == (8, 8)
    # stratified: every class holds the same share of each split, within one image
    share = torch.bincount(y_test, minlength=10) / torch.bincount(torch.cat([y_train, y_test]), minlength=10)
    assert share.min() > 0.18 and share.max() < 0.22
    again_train, again_test = load_dataset("digits")
    assert torch.equal(again_train.tensors[0], x_train) and torch.equal(again_test.tensors[1], y_test)


def test_npz_uint8_hwc_becomes_chw_in_unit_range(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(12, 5, 6, 3), dtype=np.uint8)
    y = np.arange(12) % 3
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
    train, test = load_dataset(str(path))
    xt = train.tensors[0]
    assert xt.shape == (12, 3, 5, 6)
    assert xt[3, 2, 1, 4].item() == pytest.approx(x[3, 1, 4, 2] / 255.0)
    info = describe(str(path), train, test)
    assert info.num_classes == 3 and info.in_chans == 3


def test_npz_float_chw_is_kept(tmp_path):
    x = np.random.default_rng(1).random((6, 1, 4, 4)).astype(np.float32)
    path = tmp_path / "f.npz"
    np.savez(path, x_train=x, y_train=np.zeros(6, dtype=np.int64), x_test=x, y_test=np.ones(6, dtype=np.int64))
    train, _ = load_dataset(str(path))
    assert torch.equal(train.tensors[0], torch.from_numpy(x))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x_train": np.zeros((3, 4, 4), np.uint8), "y_train": np.zeros(3, int)}, "missing arrays x_test, y_test"),
        ({"x_train": np.zeros((3, 4, 4), np.uint8), "y_train": np.zeros(2, int)}, "3 images but y_train has 2 labels"),
        (
            {"x_train": np.zeros((3, 4, 4), np.float32), "y_train": np.zeros(3, int)},
            "float x_train must be (N, C, H, W)",
        ),
        ({"x_train": np.full((3, 1, 4, 4), 2.0), "y_train": np.zeros(3, int)}, "must lie in [0, 1]"),
        ({"x_train": np.zeros((3, 4, 4), np.uint8), "y_train": np.zeros(3)}, "1-D integer array"),
        ({"x_train": np.zeros((3, 4, 4), np.uint8), "y_train": np.array([0, -1, 2])}, "labels 0..K-1"),
    ],
)
def test_npz_with_wrong_arrays_is_refused_with_a_clear_message(tmp_path, arrays, message):
    good = {
        "x_train": np.zeros((3, 4, 4), np.uint8),
        "y_train": np.zeros(3, int),
        "x_test": np.zeros((2, 4, 4), np.uint8),
        "y_test": np.zeros(2, int),
    }
    if "missing" not in message:
        arrays = {**good, **arrays}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(
        TwmlError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        load_dataset(str(path))


def test_npz_with_pickled_objects_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "evil.npz"
    objects = np.array([{"a": 1}, None], dtype=object)
    np.savez(path, x_train=objects, y_train=np.zeros(2, int), x_test=objects, y_test=np.zeros(2, int))
    with pytest.raises(TwmlError, match="not a readable .npz of plain arrays"):
        load_dataset(str(path))


def test_unknown_names_and_missing_files_are_refused(tmp_path):
    with pytest.raises(TwmlError, match="unknown data set 'imagenet-x'"):
        load_dataset("imagenet-x")
    with pytest.raises(TwmlError, match="does not exist"):
        load_dataset(str(tmp_path / "nothing.npz"))


def test_torchvision_set_offline_says_where_the_files_go(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(TwmlError, match=f"cannot load data set 'mnist' from {tmp_path}"):
        load_dataset("mnist", tmp_path)


def test_a_folder_named_like_a_data_set_does_not_replace_it(tmp_path, monkeypatch):
    """A folder ./digits beside the command leaves `digits` the embedded set; './digits' is the
    folder, and is described (and so logged) by that name, not by the embedded set's."""
    from test_examples import make_folder

    from twml_cli.data import open_dataset
    from twml_cli.examples import Folder, InMemory

    make_folder(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    embedded = open_dataset("digits")
    assert isinstance(embedded.train, InMemory) and embedded.info.name == "digits" and embedded.info.num_classes == 10
    folder = open_dataset("./digits", image_size=8, workers=0)
    assert isinstance(folder.train, Folder) and folder.info.name == "./digits" and folder.info.num_classes == 3
