"""The data pipeline: on-device augmentation keyed by (seed, pass, example), image folders that
stream, and the presets' augmentation as logged."""

import numpy as np
import pytest
import torch
from PIL import Image

from twml_cli.examples import Augment, Folder, InMemory, augment_batch, batch_indices, crop_padding, resized_crop_box


def test_an_augmented_image_is_a_crop_or_flip_of_its_input():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g)
    out = augment_batch(x, torch.arange(64), Augment("crop-flip", seed=1, pass_index=0))
    pad = crop_padding(32)
    assert pad == 4 and out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    kinds = set()
    for i in range(64):
        matches = [
            (dy, dx, f)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for f in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy : dy + 32, dx : dx + 32]))
        ]
        assert matches, f"image {i} is no crop or flip of its input"
        kinds.add(matches[0][2])
    assert kinds == {False, True}  # some are flipped, some are not
    crops = augment_batch(x, torch.arange(64), Augment("crop", seed=1, pass_index=0))
    assert not torch.equal(crops, x) and all(
        torch.equal(crops[i][:, 8:24, 8:24].flip(2), crops[i][:, 8:24, 8:24].flip(2)) for i in range(2)
    )


def test_the_same_keys_give_the_same_batch_whatever_the_batching():
    x = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    idx = torch.arange(40)
    a = augment_batch(x, idx, Augment("crop-flip", seed=7, pass_index=2))
    assert torch.equal(a, augment_batch(x, idx, Augment("crop-flip", seed=7, pass_index=2)))
    assert torch.equal(a[10:25], augment_batch(x[10:25], idx[10:25], Augment("crop-flip", seed=7, pass_index=2)))
    assert not torch.equal(
        a, augment_batch(x, idx, Augment("crop-flip", seed=7, pass_index=3))
    )  # a new pass, new draws
    assert not torch.equal(a, augment_batch(x, idx, Augment("crop-flip", seed=8, pass_index=2)))


def test_evaluation_and_none_leave_images_untouched():
    x = torch.rand(8, 3, 32, 32)
    data = InMemory(x, torch.arange(8))
    ((xb, yb, idx),) = data.batches([torch.arange(8)], torch.device("cpu"))
    assert torch.equal(xb, x) and torch.equal(idx, torch.arange(8))
    assert torch.equal(augment_batch(x, torch.arange(8), Augment("none", 0, 0)), x)


def test_global_batches_are_split_into_contiguous_shares():
    order = torch.arange(29)
    whole = batch_indices(order, 10)
    halves = [batch_indices(order, 10, part, 2) for part in (0, 1)]
    assert [len(b) for b in whole] == [10, 10, 9]
    for b, (mine, yours) in enumerate(zip(*halves)):
        assert torch.equal(torch.cat([mine, yours]), whole[b])  # every example once, in order
    assert [len(b) for b in halves[0]] == [5, 5, 5] and [len(b) for b in halves[1]] == [5, 5, 4]


def test_resized_crop_box_stays_inside_the_image():
    g = torch.Generator().manual_seed(0)
    for h, w in ((40, 60), (300, 200), (7, 7)):
        for _ in range(50):
            top, left, ch, cw = resized_crop_box(h, w, g)
            assert 0 <= top and 0 <= left and top + ch <= h and left + cw <= w and ch > 0 and cw > 0


def make_folder(root, classes=3, per_class=5, size=(12, 10)):
    """An ImageNet-style folder of small PNGs: each class a different colour, with noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 70 * c, 20, size=(*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_a_folder_streams_resized_images_keyed_like_memory(tmp_path):
    folder = Folder(make_folder(tmp_path / "data") / "train", 8, workers=0)
    assert len(folder) == 15 and folder.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    batches = list(
        folder.batches(
            [torch.tensor([0, 7]), torch.tensor([14])], torch.device("cpu"), Augment("resized-crop-flip", 0, 1)
        )
    )
    x, y, idx = batches[0]
    assert x.shape == (2, 3, 8, 8) and 0 <= x.min() and x.max() <= 1 and y.tolist() == [0, 1] and idx.tolist() == [0, 7]
    again = list(folder.batches([torch.tensor([7])], torch.device("cpu"), Augment("resized-crop-flip", 0, 1)))[0][0]
    assert torch.equal(again[0], x[1])  # keyed by (seed, pass, example), not by the batch
    plain, _ = folder.take([0, 7])
    assert plain.shape == (2, 3, 8, 8) and not torch.equal(plain, x)


def test_a_folder_has_at_most_a_worker_per_core_of_its_process(tmp_path, monkeypatch):
    """More DataLoader workers than the cores a process has only queue for them (torch warns):
    a folder takes at most its process's share of the cores (torchrun's processes share them)."""
    import os

    root = make_folder(tmp_path / "data") / "train"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert Folder(root, 8, workers=64).workers == 4 and Folder(root, 8, workers=3).workers == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's two processes share the cores
    assert Folder(root, 8, workers=64).workers == 2 and Folder(root, 8, workers=0).workers == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert Folder(root, 8, workers=64).workers == 1


def test_an_image_folder_trains_and_is_attacked_through_the_cli(cli, tmp_path):
    root = make_folder(tmp_path / "shapes")
    result = cli(
        "train",
        "--dataset",
        str(root),
        "--image-size",
        "16",
        "--workers",
        "0",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--pgd-steps",
        "2",
        "--eval-batch-size",
        "4",
    )
    assert result.code == 0, result.err
    (run,) = cli.runs("train")
    p, m = run.data.params, run.data.metrics
    assert (p["dataset"], p["image_size"], p["augmentation"]) == (str(root), "16", "resized-crop-flip")
    assert m["sgd_steps"] == 2 * 2 and 0 <= m["accuracy"] <= 1  # 15 images in batches of 8: 2 a pass
    attacked = cli("attack", "--run", run.info.run_id, "--pgd-steps", "2", "--workers", "0")
    assert attacked.code == 0, attacked.err
    assert cli.runs("attack")[0].data.params["dataset"] == str(root)  # the model's own data
    refused = cli("backdoor", "--dataset", str(root), "--image-size", "16")
    assert refused.code == 2 and "needs a data set that fits in memory" in refused.err
    refused = cli("cleanse", "--run", run.info.run_id)  # the model's folder, read for no search
    assert refused.code == 2 and f"twml cleanse needs a data set that fits in memory; '{root}'" in refused.err


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_that_is_not_an_image_is_named_in_one_line(cli, tmp_path, workers):
    root = make_folder(tmp_path / "shapes")
    bad = root / "train" / "class1" / "notes.png"
    bad.write_text("not an image, only named like one")
    args = ["--dataset", str(root), "--image-size", "8", "--workers", str(workers), "--epochs", "1", "--pgd-steps", "1"]
    result = cli("train", *args)
    assert result.code == 2, result.err
    assert result.err.strip() == (
        f"twml: error: image folder file '{bad}' is not an image PIL can read "
        "(no image format PIL knows); remove or replace it"
    )
    assert all(r.info.status != "RUNNING" for r in cli.runs())


def test_presets_log_their_augmentation(cli, tmp_path):
    rng = np.random.default_rng(0)
    cifar_like = tmp_path / "cifar_like.npz"
    x = rng.integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    np.savez(cifar_like, x_train=x, y_train=np.arange(40) % 10, x_test=x[:20], y_test=np.arange(20) % 10)
    args = ("--epochs", "1", "--pgd-steps", "1", "--batch-size", "20", "--model", "test_byobnet")
    assert cli("train", "--preset", "cifar10", "--dataset", str(cifar_like), *args).code == 0
    assert cli("train", *args).code == 0
    assert cli("train", "--no-augment", "--preset", "cifar10", "--dataset", str(cifar_like), *args).code == 0
    logged = [
        (r.data.params["dataset"], r.data.params["augment"], r.data.params["augmentation"])
        for r in reversed(cli.runs("train"))
    ]
    assert logged == [
        (str(cifar_like), "True", "crop-flip"),
        ("digits", "True", "none"),
        (str(cifar_like), "False", "none"),
    ]


@pytest.mark.parametrize(
    "name, policy",
    [("cifar10", "crop-flip"), ("cifar100", "crop-flip"), ("svhn", "crop"), ("mnist", "none"), ("digits", "none")],
)
def test_each_data_set_has_its_usual_augmentation(name, policy):
    from twml_cli.examples import usual_augmentation

    assert (
        usual_augmentation(name, streamed=False) == policy
        and usual_augmentation("x", streamed=True) == "resized-crop-flip"
    )
