import pytest
import torch
from torch import nn

from twml_cli.backdoor import Trigger, attack_success_rate, default_trigger_size, poison


def test_default_trigger_is_a_tenth_of_the_side_at_least_two():
    assert [default_trigger_size(s, s) for s in (8, 16, 28, 32, 64, 224)] == [1, 2, 3, 3, 6, 22]


@pytest.mark.parametrize(
    "position, rows, cols",
    [
        ("bottom-right", (6, 8), (6, 8)),
        ("top-left", (0, 2), (0, 2)),
        ("top-right", (0, 2), (6, 8)),
        ("bottom-left", (6, 8), (0, 2)),
        ("centre", (3, 5), (3, 5)),
    ],
)
def test_trigger_stamps_a_white_square_in_its_place(position, rows, cols):
    x = torch.rand(3, 2, 8, 8) * 0.5
    out = Trigger(2, position).apply(x)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert torch.all(out[..., region] == 1.0)
    assert torch.equal(out[..., ~region], x[..., ~region])
    assert not torch.equal(out, x) and x.max() <= 0.5  # the input is not modified


@pytest.mark.parametrize(
    "size, height, width, rows, cols", [(1, 8, 8, (3, 4), (3, 4)), (3, 8, 8, (2, 5), (2, 5)), (2, 7, 9, (2, 4), (3, 5))]
)
def test_centre_trigger_sits_in_the_middle(size, height, width, rows, cols):
    region = Trigger(size, "centre").region(height, width)
    assert (region[0].start, region[0].stop, region[1].start, region[1].stop) == (*rows, *cols)


def test_poison_relabels_the_chosen_fraction_of_other_classes():
    x = torch.rand(200, 1, 8, 8) * 0.9
    y = torch.arange(200) % 10
    x_p, y_p, idx = poison(x, y, target=3, rate=0.1, trigger=Trigger(2), seed=0)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert torch.all(y[idx] != 3) and torch.all(y_p[idx] == 3)
    assert torch.all(x_p[idx][..., 6:, 6:] == 1.0)
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(x_p[untouched], x[untouched]) and torch.equal(y_p[untouched], y[untouched])
    assert torch.equal(poison(x, y, 3, 0.1, Trigger(2), seed=0)[2], idx)  # seeded


def test_poison_refuses_bad_rates_and_oversized_triggers():
    x, y = torch.rand(10, 1, 8, 8), torch.arange(10)
    for rate in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="poison rate"):
            poison(x, y, 0, rate, Trigger(2))
    with pytest.raises(ValueError, match="larger than the 8x8 image"):
        poison(x, y, 0, 0.1, Trigger(9))
    with pytest.raises(ValueError, match="position"):
        Trigger(2, "middle")


class CornerDetector(nn.Module):
    """Predicts class 7 when the bottom-right pixel is white, else class 0."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        white = (x[:, 0, -1, -1] > 0.99).float()
        return torch.stack([1 - white] + [torch.zeros_like(white)] * 6 + [white], dim=1) + 0 * self.p


def test_attack_success_rate_counts_only_images_not_of_the_target_class():
    x = torch.zeros(10, 1, 8, 8)
    y = torch.tensor([7, 7, 7, 7, 1, 2, 3, 4, 5, 6])
    assert attack_success_rate(CornerDetector(), x, y, target=7, trigger=Trigger(2)) == 1.0
    assert attack_success_rate(CornerDetector(), x, y, target=7, trigger=Trigger(2, "top-left")) == 0.0
