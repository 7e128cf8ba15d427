"""Neural Cleanse's mitigation (Wang et al., IEEE S&P 2019, section VI): repair a backdoored model
with the trigger Neural Cleanse reversed, without knowing the real one.

- Unlearning: fine-tune on clean training images of which a fraction (the paper: 20%) carry
  the reversed trigger under their TRUE label, so the model learns to ignore it.
- Pruning: rank the neurons of the second-to-last layer (the features the classifier reads)
  by how much more the reversed trigger activates them than clean images do, and remove the
  top ones step by step until the reversed trigger stops working. A neuron is removed by
  zeroing the classifier's weights that read it, so the repaired model is an ordinary model.
- Filtering: leave the model as it is and reject, at inference, the images whose mean activation
  on the top 1% of those neurons exceeds a threshold that rejects 5% of clean images.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import accuracy
from .backdoor import stamped_success_rate
from .cleanse import stamp
from .configs import UnlearnConfig
from .models import Classifier
from .runtime import autocast, batches, generator, to_device_layout

UNLEARN_STREAM = 10


RESTARTS = 4  # halvings of the learning rate after a fine-tune that lost its clean images


@dataclass(frozen=True)
class Unlearned:
    """How unlearning went: the learning rate of the fine-tune kept, the unstamped images' accuracy
    before unlearning and after it, and the fine-tunes that lost those images and were not kept, each
    as (its learning rate, the accuracy it ended at)."""

    lr: float
    started: float
    ended: float
    lost: tuple[tuple[float, float], ...] = ()


def unlearn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    triggers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    config: UnlearnConfig,
) -> Unlearned:
    """Fine-tune `model` in place on (x, y) with config.fraction of the images stamped with a
    reversed trigger (mask, pattern), labels unchanged; with several triggers (one per search
    of the cleanse run) the stamped images take them in turn. SGD with momentum at
    config.lr, constant or warmed up. The normalization layers' statistics stay as trained when
    config.freeze_norm (the trigger is then removed under those statistics only); otherwise, with
    config.clean_norm, every batch is normalized with its unstamped images' statistics, which the
    running ones follow, and those are estimated again on the clean images at the end of each
    fine-tune (_CleanStatistics, estimate_norm_statistics); without it, train-mode BatchNorm on
    the whole batch, stamped images included (the paper's).

    With config.distill > 0, each batch's unstamped images also pull the features the classifier
    reads toward the model's own before unlearning (their squared distance relative to the
    features' squared norm, times config.distill): the stamped images learn to ignore the trigger
    while the clean ones keep what the model made of them.

    A fine-tune that ends more than config.restart_fall below the unstamped images' accuracy it
    started at (it trained on them: the rate was too high for this model) starts again from the
    model as it was, with the same images stamped in the same order, at half the learning rate, up
    to RESTARTS times: on a model whose frozen normalization makes it sensitive to its weights, the
    default rate can wreck it in a few steps. A fine-tune that keeps its clean images is kept as it
    is; if none does, the one that ended highest is kept."""
    device = next(model.parameters()).device
    x, y = to_device_layout(x, device), y.to(device)
    clean_x = x
    g = generator(torch.device("cpu"), config.seed, UNLEARN_STREAM)
    chosen = draw(len(x), config.fraction, g)
    originals = x[chosen.to(device)] if config.hold_stamped > 0 else None  # the stamped images, unstamped
    x = stamped_at(x, triggers, chosen.to(device))
    unstamped = _unstamped(chosen, len(x), device)
    start, after_draw = copy.deepcopy(model.state_dict()), g.get_state()
    started = accuracy(model, (x[unstamped], y[unstamped]))
    lost: list[tuple[float, float]] = []
    best: dict[str, Any] = {}  # the weights of the fine-tune that, of those that lost the images, ended highest
    lr = config.lr
    for _ in range(RESTARTS + 1):
        _fine_tune(model, x, y, chosen, replace(config, lr=lr), g, originals)
        if config.clean_statistics:
            estimate_norm_statistics(model, clean_x, config.batch_size)
        ended = accuracy(model, (x[unstamped], y[unstamped]))
        if ended >= started - config.restart_fall:
            break
        if not lost or ended > max(acc for _, acc in lost):
            best = copy.deepcopy(model.state_dict())
        lost.append((lr, ended))
        model.load_state_dict(start)
        g.set_state(after_draw)
        lr /= 2
    else:  # none kept them
        lr, ended = max(lost, key=lambda tried: tried[1])
        lost.remove((lr, ended))
        model.load_state_dict(best)
    model.eval()
    return Unlearned(lr, started, ended, tuple(lost))


def _fine_tune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    chosen: torch.Tensor,
    config: UnlearnConfig,
    g: torch.Generator,
    originals: torch.Tensor | None = None,
) -> None:
    """One fine-tune of unlearn's, with the images `chosen` stamped (`originals`: the same images
    unstamped, for config.hold_stamped), in the order g draws."""
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    per_epoch = math.ceil(len(x) / config.batch_size)
    rates = _rates(config, per_epoch)
    pulled = config.distill > 0 or config.hold_stamped > 0
    held = _FeaturePull(model, chosen, len(x), config, originals) if pulled else contextlib.nullcontext()
    normalized = _CleanStatistics(model, chosen, len(x)) if config.clean_statistics else contextlib.nullcontext()
    with held as kept, normalized as norm:
        for epoch in range(config.epochs):
            model.train()
            if config.freeze_norm:
                for module in _batch_norms(model):
                    module.eval()
            order = torch.randperm(len(x), generator=g).to(device)
            for k, s in enumerate(batches(len(x), config.batch_size)):
                idx = order[s]
                if norm is not None:
                    idx = norm.batch(idx)
                xb = x[idx]
                for group in optimizer.param_groups:
                    group["lr"] = rates[epoch * per_epoch + k]
                with autocast(device):
                    loss = F.cross_entropy(model(xb), y[idx])
                    if kept is not None:
                        loss = loss + kept.pull(xb, idx)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


class _FeaturePull:
    """The features the classifier reads (its input), of the model being unlearned and of a frozen
    copy of it as it was: pull(xb, idx), after the model's forward on xb (which records its
    features), is config.distill times their distance on the batch's unstamped images plus
    config.hold_stamped times their distance on its stamped ones, each against what the frozen
    copy made of the clean image (`originals`: the stamped images before stamping, in the order of
    `chosen`). A distance is squared and relative to the clean features' squared norm. A context:
    its hook goes on exit."""

    def __init__(
        self, model: nn.Module, chosen: torch.Tensor, n: int, config: UnlearnConfig, originals: torch.Tensor | None
    ):
        self.before = cast(Classifier, copy.deepcopy(model).requires_grad_(False))
        self.row = torch.full((n,), -1, dtype=torch.long)  # each image's row in originals (-1: unstamped)
        self.row[chosen] = torch.arange(len(chosen))
        self.row = self.row.to(next(model.parameters()).device)
        self.distill, self.hold_stamped, self.originals = config.distill, config.hold_stamped, originals
        self.seen: list[torch.Tensor] = []
        head = cast(Any, model).backbone.get_classifier()
        self.hook = head.register_forward_hook(lambda _m, args, _out: self.seen.append(args[0]))

    def pull(self, xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        (now,) = self.seen
        self.seen.clear()
        rows = self.row[idx]
        clean = rows < 0
        loss = now.sum() * 0
        if self.distill > 0 and clean.any():
            loss = loss + self.distill * self._distance(now[clean], xb[clean])
        if self.hold_stamped > 0 and self.originals is not None and not clean.all():
            loss = loss + self.hold_stamped * self._distance(now[~clean], self.originals[rows[~clean]])
        return loss

    def _distance(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        then = penultimate(self.before, images)
        return ((features.float() - then) ** 2).sum(1).mean() / (then**2).sum(1).mean().clamp_min(1e-12)

    def __enter__(self) -> _FeaturePull:
        return self

    def __exit__(self, *_) -> None:  # the hook goes, whether unlearning ended or raised
        self.hook.remove()


class _CleanStatistics:
    """Train-mode BatchNorm whose statistics come from the batch's unstamped images alone: every
    image of the batch, stamped or not, is normalized with the mean and variance of its unstamped
    ones (the gradient flows through them, as through train-mode BatchNorm's), and the running
    statistics follow them. The stamped images never enter the statistics, so the repair cannot
    lie in statistics that clean images would not give. batch(idx), before each forward, returns
    the batch's order: its unstamped images first. A context: its hooks go on exit.

    Each layer's own forward runs in eval mode on its input mapped so that the running statistics
    give the clean images' normalization: (x - mean) / sqrt(var + eps) * sqrt(running_var + eps) +
    running_mean, which its eval-mode normalization returns to (x - mean) / sqrt(var + eps)."""

    def __init__(self, model: nn.Module, chosen: torch.Tensor, n: int):
        self.unstamped = _unstamped(chosen, n, next(model.parameters()).device)
        self.count = 0  # of the batch's images, its first, that are unstamped
        self.switched: set[int] = set()
        norms = _batch_norms(model)
        self.hooks = [m.register_forward_pre_hook(self._before) for m in norms]
        self.hooks += [m.register_forward_hook(self._after) for m in norms]

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """The batch `idx`, its unstamped images first (the layers then read them as a slice): the
        order its forward must take."""
        clean = self.unstamped[idx]
        idx = torch.cat([idx[clean], idx[~clean]])
        self.count = int(clean.sum())
        return idx

    def _before(self, m: nn.Module, args: tuple[torch.Tensor, ...]):
        norm = cast(nn.modules.batchnorm._BatchNorm, m)
        if not norm.training or self.count < 2 or norm.running_mean is None or norm.running_var is None:
            return None  # a batch without two clean images: its own statistics
        (x,) = args
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        work = torch.promote_types(x.dtype, torch.float32)  # bf16 under autocast: the statistics in fp32
        clean = x[: self.count].to(work)
        mean = clean.mean(dims)
        var = (clean - mean.view(shape)).square().mean(dims)
        with torch.no_grad():
            count = self.count * x[0, 0].numel()  # values per channel
            assert norm.num_batches_tracked is not None
            norm.num_batches_tracked.add_(1)
            momentum = norm.momentum if norm.momentum is not None else 1 / float(norm.num_batches_tracked)
            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), momentum)
            norm.running_var.lerp_((var * count / (count - 1)).to(norm.running_var.dtype), momentum)
        scale = ((norm.running_var + norm.eps) / (var + norm.eps)).sqrt()
        mapped = torch.addcmul((norm.running_mean - mean * scale).view(shape), x.to(work), scale.view(shape))
        norm.training = False
        self.switched.add(id(m))
        return (mapped.to(x.dtype),)

    def _after(self, m: nn.Module, _args, _out) -> None:
        if id(m) in self.switched:
            self.switched.discard(id(m))
            m.training = True

    def __enter__(self) -> _CleanStatistics:
        return self

    def __exit__(self, *_) -> None:
        for hook in self.hooks:
            hook.remove()


def estimate_norm_statistics(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> None:
    """Estimate the BatchNorm layers' running statistics again, in place, as the plain mean over
    the batches of x (no momentum: every batch counts alike), the weights as they are. The model
    is left in eval mode."""
    norms = _batch_norms(model)
    if not norms:  # no running statistics (LayerNorm, GroupNorm): nothing to estimate
        model.eval()
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    model.eval()
    for norm in norms:
        norm.train()
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device):
        for s in batches(len(x), batch_size):
            model(to_device_layout(x[s], device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers (timm's BatchNormAct2d among them): those with running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _unstamped(chosen: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """A mask over n images, False at those `chosen` to be stamped."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[chosen] = False
    return mask.to(device)


def draw(n: int, fraction: float, g: torch.Generator) -> torch.Tensor:
    """Which of n images unlearning stamps: ceil(fraction * n) of them, drawn with g."""
    return torch.randperm(n, generator=g)[: math.ceil(fraction * n)]


def stamped_at(
    x: torch.Tensor, triggers: Sequence[tuple[torch.Tensor, torch.Tensor]], chosen: torch.Tensor
) -> torch.Tensor:
    """A copy of x with the images `chosen` stamped: the first with the first trigger, the second
    with the second, and so on in turn."""
    if not triggers:
        raise ValueError("unlearning needs at least one reversed trigger")
    x = x.clone()
    for k, (mask, pattern) in enumerate(triggers):
        some = chosen[k :: len(triggers)]
        x[some] = stamp(x[some], mask.to(x.device), pattern.to(x.device))
    return x


def _rates(config: UnlearnConfig, per_epoch: int) -> list[float]:
    """The learning rate of every step: constant, or one epoch of linear warmup from 0 and a
    cosine down to 0 over the rest (a fine-tune that starts gently and ends converged)."""
    total = config.epochs * per_epoch
    if config.schedule == "constant":
        return [config.lr] * total
    warm = min(per_epoch, total - 1)
    return [
        config.lr * (k + 1) / warm
        if k < warm
        else config.lr * 0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, total - warm)))
        for k in range(total)
    ]


def penultimate(model: Classifier, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The features the classifier of a timm model (behind twml's Normalize) reads: (N, C)."""
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.inference_mode(), autocast(device):
        for s in batches(len(x), batch_size):
            xb = model.normalize(to_device_layout(x[s], device))
            backbone: Any = model.backbone  # a timm model: forward_features, forward_head
            out.append(backbone.forward_head(backbone.forward_features(xb), pre_logits=True).float())
    return torch.cat(out)


def excited(
    model: Classifier, others: torch.Tensor, triggers: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """The penultimate neurons, the one the reversed triggers (mask, pattern) excite most first: by
    their mean activation on the clean images `others` (of classes other than the target) stamped,
    less unstamped, averaged over the triggers."""
    clean = penultimate(model, others).mean(0)
    gain = torch.stack([penultimate(model, stamp(others, mask, pattern)).mean(0) - clean for mask, pattern in triggers])
    return gain.mean(0).argsort(descending=True)


@dataclass(frozen=True)
class InputFilter:
    """The paper's filter for triggered inputs (section VI.A): an image is rejected when the mean
    activation of `neurons` (of the `of` penultimate neurons, those the reversed triggers excite
    most) exceeds `threshold`."""

    neurons: torch.Tensor  # indices into the penultimate layer, int64
    threshold: float
    of: int

    def profile(self, features: torch.Tensor) -> torch.Tensor:
        """The mean activation of its neurons, per image whose penultimate features these are (N, of)."""
        return features[:, self.neurons.to(features.device)].float().mean(1)

    def rejects(self, features: torch.Tensor) -> torch.Tensor:
        """Which of the images whose penultimate features these are it rejects."""
        return self.profile(features) > self.threshold


def fit_filter(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    target: int,
    triggers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    neurons: float = 0.01,
    rejects: float = 0.05,
) -> InputFilter:
    """The filter of `neurons` of the penultimate layer (a fraction, at least one neuron), those the
    reversed triggers (mask, pattern) excite most on the clean images x of other classes than the
    target, with the threshold that rejects at most `rejects` of all the clean images x (ties at it
    are kept)."""
    ranking = excited(model, x[y != target], triggers)
    top = ranking[: max(1, round(neurons * len(ranking)))].cpu()
    calibration = penultimate(model, x)[:, top].mean(1).sort().values
    kept = math.ceil((1 - rejects) * len(x))  # the images at or under the threshold: all but `rejects` of them
    return InputFilter(top, float(calibration[kept - 1]), len(ranking))


class Filtered(nn.Module):
    """A model behind an input filter: the model's logits and one more, 'rejected', that is the largest
    exactly where the filter rejects the image. A rejected image is then neither classified right
    nor sent to a target: accuracy and attack success count it as the filter would have it."""

    def __init__(self, model: Classifier, input_filter: InputFilter):
        super().__init__()
        self.model, self.filter = model, input_filter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone: Any = self.model.backbone
        hidden = backbone.forward_features(self.model.normalize(x))
        features, logits = backbone.forward_head(hidden, pre_logits=True), backbone.forward_head(hidden)
        rejected = self.filter.rejects(features)
        top, bottom = logits.max(1).values, logits.min(1).values
        return torch.cat([logits, torch.where(rejected, top + 1, bottom - 1)[:, None]], 1)


def save_filter(input_filter: InputFilter, path: str | Path) -> None:
    """The filter as safetensors: its neurons, threshold and the penultimate layer's width."""
    from safetensors.torch import save_file

    f = input_filter
    save_file(
        {
            "neurons": f.neurons.to(torch.int64).contiguous(),
            "threshold": torch.tensor([f.threshold], dtype=torch.float64),
            "of": torch.tensor([f.of], dtype=torch.int64),
        },
        str(path),
    )


def load_filter(path: str | Path) -> InputFilter:
    """A filter save_filter wrote (`input-filter.safetensors` among a `twml mitigate --mitigation
    filter` run's artifacts): Filtered(model, load_filter(path)) serves the model behind it."""
    from safetensors.torch import load_file

    z = load_file(str(path))
    return InputFilter(z["neurons"], float(z["threshold"][0]), int(z["of"][0]))


def profiles(model: Classifier, input_filter: InputFilter, x: torch.Tensor) -> torch.Tensor:
    """The filter's profile of each image x (the mean activation of its neurons): above its
    threshold, rejected."""
    return input_filter.profile(penultimate(model, x)).cpu()


@dataclass(frozen=True)
class PruneResult:
    """What pruning did: neurons removed of the penultimate layer's, and the reversed trigger's success after."""

    pruned: int  # neurons removed
    neurons: int  # of the penultimate layer
    reversed_success: float  # of the reversed trigger once pruned


def prune(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    target: int,
    mask: torch.Tensor,
    pattern: torch.Tensor,
    step: float = 0.05,
    stop_below: float = 0.05,
    max_fraction: float = 0.5,
) -> PruneResult:
    """Remove, in steps of `step` of the neurons, those the reversed trigger excites most (on
    clean images x of other classes than the target), until the reversed trigger sends fewer
    than `stop_below` of them to the target, or max_fraction is removed. In place."""
    others = x[y != target]
    ranking = excited(model, others, [(mask, pattern)])
    head = cast(Any, model.backbone).get_classifier()
    neurons = head.weight.shape[1]

    def success() -> float:
        return stamped_success_rate(model, others, target, lambda z: stamp(z, mask.to(z.device), pattern.to(z.device)))

    removed, rate = 0, success()
    while rate >= stop_below and removed < int(max_fraction * neurons):
        removed = min(removed + max(1, round(step * neurons)), int(max_fraction * neurons))
        with torch.no_grad():
            head.weight[:, ranking[:removed]] = 0
        rate = success()
    return PruneResult(removed, neurons, rate)
