"""Randomized smoothing (Cohen, Rosenfeld, Kolter, ICML 2019).

The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c). CERTIFY returns a
class and an L2 radius within which g is constant with probability >= 1 - alpha over the
noise; PREDICT returns g(x) or abstains, and is wrong with probability <= alpha.

Noise for example `index` is drawn in blocks of NOISE_BLOCK samples, each from a stream
keyed by (seed, index, phase, block). An example's certificate therefore does not depend
on the batch size, on which other examples share its batches, or on how a test set is
split across processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from . import distributed, runtime
from .configs import check_certify_args
from .models import is_compiled
from .runtime import Progress, Timer, autocast, generator, no_progress

ABSTAIN = -1
TABLE_RADII = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)  # where tables read certified accuracy
FUTILITY = 0.2  # certify_grid's default: give up on a radius when an 80% upper bound of pA is below its reach
NOISE_BLOCK = 1000  # samples per noise stream; fixed, so certificates are batch-independent
FIRST_LOOK, GROWTH = 500, 1.5  # certify_grid's looks: 500 samples, then 1.5 times as many each time
SELECTION, ESTIMATION, PREDICTION = 0, 1, 2  # phases: separate streams, never reused


@dataclass(frozen=True)
class Certificate:
    """Per-example results of a batch certification (CPU arrays)."""

    prediction: np.ndarray  # class, or ABSTAIN (-1)
    radius: np.ndarray  # certified L2 radius in [0, 1] pixel units (0 when abstaining)
    count: np.ndarray  # nA: votes for the selected class among the n estimation samples
    p_lower: np.ndarray  # one-sided (1 - alpha) Clopper-Pearson lower bound of pA


@dataclass(frozen=True)
class GridCertificate:
    """Per-example results of certify_grid (CPU arrays)."""

    prediction: np.ndarray  # class, or ABSTAIN (-1)
    radius: np.ndarray  # the largest grid radius certified; 0 when none (or only radius 0) is
    samples: np.ndarray  # noise samples used: n0 plus the estimation samples drawn
    count: np.ndarray  # nA at the last look
    p_lower: np.ndarray  # the last look's lower bound of pA (at that look's level)


def rounds(n_max: int) -> list[int]:
    """certify_grid's looks (cumulative sample sizes): FIRST_LOOK, then GROWTH times the last
    (rounded to hundreds), capped at n_max: 500, 800, 1,200, ..., 13,500, 20,000 for 20,000."""
    sizes = [min(FIRST_LOOK, n_max)]
    while sizes[-1] < n_max:
        sizes.append(min(int(round(GROWTH * sizes[-1], -2)), n_max))
    return sizes


def look_levels(looks: int, alpha: float) -> np.ndarray:
    """certify_grid's alpha spending: half of alpha at the last look, the other half split evenly
    over the earlier ones (all of it at the only look). The levels sum to alpha."""
    if looks == 1:
        return np.array([alpha])
    return np.array([alpha / 2 / (looks - 1)] * (looks - 1) + [alpha / 2])


class Smooth:
    """A smoothed classifier around `base_classifier` (which takes [0, 1] images)."""

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, seed: int = 0):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma
        self.seed = seed

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, index: int = 0
    ) -> tuple[int, float]:
        """CERTIFY for one image x (C, H, W): (class, L2 radius), or (-1, 0.0) to abstain.

        1. n0 noisy samples select the top class cA;
        2. n fresh samples count nA, the votes for cA;
        3. pA_lower = one-sided (1 - alpha) Clopper-Pearson lower bound of nA / n;
        4. abstain if pA_lower < 1/2, else return cA and radius sigma * Phi^-1(pA_lower).
        `index` names the example's noise stream.
        """
        cert = self.certify_batch(x[None], n0, n, alpha, batch_size, indices=[index])
        return int(cert.prediction[0]), float(cert.radius[0])

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, index: int = 0) -> int:
        """PREDICT for one image: the top class of n noisy samples, or -1 when a two-sided
        binomial test cannot tell the top two classes apart at level alpha."""
        counts = self._counts(x[None], [index], PREDICTION, n, batch_size)[0].cpu()
        top2 = counts.topk(2)
        c1, c2 = int(top2.values[0]), int(top2.values[1])
        if binomtest(c1, c1 + c2, p=0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2.indices[0])

    def certify_batch(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        indices: Sequence[int] | None = None,
    ) -> Certificate:
        """CERTIFY for many images at once (the same certificates as one at a time).

        The noisy copies of several images share forward batches; votes are counted on the
        device with bincount; there is one host copy at the end.
        """
        check_certify_args(n0, n, alpha, batch_size)
        indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
        selection = self._counts(x, indices, SELECTION, n0, batch_size)
        estimation = self._counts(x, indices, ESTIMATION, n, batch_size)
        top = selection.argmax(1)
        c_a, n_a = top.cpu().numpy(), estimation.gather(1, top[:, None])[:, 0].cpu().numpy()
        p_lower = lower_confidence_bound(n_a, n, alpha)
        certified = p_lower >= 0.5
        radius = np.where(certified, self.sigma * norm.ppf(np.where(certified, p_lower, 0.5)), 0.0)
        prediction = np.where(certified, c_a, ABSTAIN)
        return Certificate(prediction=prediction, radius=radius, count=n_a, p_lower=p_lower)

    def certify_grid(
        self,
        x: torch.Tensor,
        radii: Sequence[float],
        n0: int,
        n_max: int,
        alpha: float,
        batch_size: int,
        indices: Sequence[int] | None = None,
        futility: float = FUTILITY,
    ) -> GridCertificate:
        """Is each image certified at each radius of a grid? CERTIFY's question, asked with as few
        samples as the answer needs.

        n0 samples select the class cA, as in CERTIFY. Fresh samples then come in growing rounds
        (rounds(n_max): the first samples fixed-n CERTIFY would draw for the same image). After
        look k, a one-sided Clopper-Pearson lower bound of pA at level alpha_k certifies radius
        r when it reaches Phi(r / sigma). The levels (look_levels) sum to alpha: a union bound
        over the looks of this fixed schedule, so the chance that any certificate of an image is
        wrong is at most alpha however early it stops (one bound of pA serves every radius).
        Half of alpha goes to the last look, where the images fixed n finds hard are decided,
        so it is nearly as strong as CERTIFY's; the earlier looks settle clear cases, where a
        smaller level costs few samples.

        An image stops once every radius is settled: certified, or out of reach: even all
        remaining samples voting cA could not certify it at the last look, or a one-sided
        (1 - futility) upper bound of pA lies below the vote fraction the last look would need
        (votes_needed). Giving up never makes a certificate wrong; it can miss one that fixed n
        would find, more often the larger `futility` is.
        """
        check_certify_args(n0, n_max, alpha, batch_size)
        if not 0 < futility < 0.5:
            raise ValueError(f"futility must lie in (0, 0.5), got {futility}")
        indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
        grid = np.array(sorted({0.0, *(float(r) for r in radii)}))
        need = norm.cdf(grid / self.sigma)  # pA_lower must reach these (radius 0: 1/2, else abstain)
        looks = rounds(n_max)
        levels = look_levels(len(looks), alpha)
        within_reach = votes_needed(need, n_max, levels[-1])  # the vote fraction the last look needs for each radius
        c_a = self._counts(x, indices, SELECTION, n0, batch_size).argmax(1)
        n_a = np.zeros(len(x), dtype=np.int64)
        used = np.zeros(len(x), dtype=np.int64)
        reached = np.full(len(x), -1)  # index into grid of the largest radius certified so far
        p_lower = np.zeros(len(x))
        active = np.arange(len(x))
        done = 0
        for size, level in zip(looks, levels):
            rows = torch.as_tensor(active, device=c_a.device)
            votes = self._counts(
                x[rows.cpu()], [indices[i] for i in active], ESTIMATION, size, batch_size, skip=done, total=n_max
            )
            n_a[active] += votes.gather(1, c_a[rows][:, None])[:, 0].cpu().numpy()
            used[active] = size
            low = lower_confidence_bound(n_a[active], size, level)
            p_lower[active] = low
            reached[active] = np.maximum(reached[active], np.searchsorted(need, low, side="right") - 1)
            nxt = np.minimum(reached[active] + 1, len(grid) - 1)
            best_case = lower_confidence_bound(n_a[active] + (n_max - size), n_max, levels[-1])
            high = upper_confidence_bound(n_a[active], size, futility)
            open_ = (reached[active] < len(grid) - 1) & (best_case >= need[nxt]) & (high >= within_reach[nxt])
            active, done = active[open_], size
            if len(active) == 0:
                break
        certified = reached >= 0
        return GridCertificate(
            prediction=np.where(certified, c_a.cpu().numpy(), ABSTAIN),
            radius=np.where(certified, grid[np.maximum(reached, 0)], 0.0),
            samples=n0 + used,
            count=n_a,
            p_lower=p_lower,
        )

    def _counts(
        self,
        x: torch.Tensor,
        indices: list[int],
        phase: int,
        num: int,
        batch_size: int,
        skip: int = 0,
        total: int | None = None,
    ) -> torch.Tensor:
        """(len(x), num_classes) votes of the base classifier on noisy copies `skip` to `num` of
        each image (the first `skip` were counted before) out of a draw of `total` (default num)."""
        model = self.base_classifier
        device = next(model.parameters()).device
        x = x.to(device)
        k = self.num_classes
        counts = torch.zeros(len(x) * k, dtype=torch.long, device=device)
        model.eval()

        def votes(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            owner, noise = pair
            with torch.inference_mode():
                batch = (x[owner] + self.sigma * noise).contiguous(memory_format=torch.channels_last)
                with autocast(device):
                    predictions = model(batch).argmax(1)
            return torch.bincount(owner * k + predictions, minlength=len(x) * k)

        noisy = self._noise_batches(x, indices, phase, num, batch_size, device, skip, total or num)
        with torch.inference_mode():  # the noise, drawn on this thread
            for batch_votes in runtime.forward_pool(votes, noisy, device, parallel=not is_compiled(model)):
                counts += batch_votes  # whole numbers: the sum does not depend on the order
        return counts.view(len(x), k)

    def _noise_batches(
        self,
        x: torch.Tensor,
        indices: list[int],
        phase: int,
        num: int,
        batch_size: int,
        device: torch.device,
        skip: int,
        total: int,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(owner, noise) batches of at most batch_size samples: owner[j] is the row of x that
        sample j perturbs. A draw of `total` samples per example comes in blocks of NOISE_BLOCK
        (the last may be shorter), each from its own keyed stream; this yields samples `skip`
        to `num` of it, so sample i is the same however the range is split into looks."""
        owners: list[torch.Tensor] = []
        noises: list[torch.Tensor] = []
        pending = 0
        for row, index in enumerate(indices):
            for block in range(skip // NOISE_BLOCK, math.ceil(num / NOISE_BLOCK)):
                start = block * NOISE_BLOCK
                length = min(NOISE_BLOCK, total - start)
                lo, hi = max(skip, start) - start, min(num, start + length) - start
                gen = generator(device, self.seed, index, phase, block)
                noise = torch.randn((length, *x.shape[1:]), generator=gen, device=device)
                noises.append(
                    noise if hi - lo == length else noise[lo:hi].clone()
                )  # a clone frees the rest of the block
                owners.append(torch.full((hi - lo,), row, dtype=torch.long, device=device))
                pending += hi - lo
                while pending >= batch_size:
                    owner, noise = torch.cat(owners), torch.cat(noises)
                    yield owner[:batch_size], noise[:batch_size]
                    owners, noises = [owner[batch_size:]], [noise[batch_size:]]
                    pending -= batch_size
        if pending:
            yield torch.cat(owners), torch.cat(noises)


def lower_confidence_bound(n_a, n: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion nA / n:
    the alpha-quantile of Beta(nA, n - nA + 1), and 0 when nA = 0."""
    return np.asarray(proportion_confint(np.asarray(n_a), n, alpha=2 * alpha, method="beta")[0], dtype=np.float64)


ROWS = ("idx", "label", "predict", "radius", "correct", "time_s", "samples")  # certify.csv's columns


def votes_needed(thresholds: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """For each threshold, the smallest vote fraction k / n whose lower bound at level alpha
    reaches it (above 1 when even n votes of n do not)."""
    k = np.arange(n + 1)
    bounds = lower_confidence_bound(k, n, alpha)  # increasing in k
    first = np.searchsorted(bounds, thresholds, side="left")
    return np.where(first <= n, first / n, np.inf)


def upper_confidence_bound(n_a, n: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on nA / n (1 when nA = n)."""
    return np.asarray(proportion_confint(np.asarray(n_a), n, alpha=2 * alpha, method="beta")[1], dtype=np.float64)


def certify_dataset(
    smooth: Smooth,
    data,
    indices: Sequence[int],
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    progress: Progress = no_progress,
    done: dict[str, np.ndarray] | None = None,
    save_rows: Callable[[dict[str, np.ndarray]], None] | None = None,
    grid: Sequence[float] | None = None,
    futility: float = FUTILITY,
) -> dict[str, np.ndarray]:
    """Certify the test examples `indices` of `data` (examples, or a pair of tensors) in
    chunks that fill the forward batches: CERTIFY with n samples each, or, given a `grid` of
    radii, certify_grid with n as the cap (and `futility`).

    Returns the per-example table (ROWS; time_s is the chunk's wall time shared equally among
    its examples, so the column sums to the certification's time), in the order of `indices`.
    Rows in `done` (an interrupted run's) are kept and not certified again; `save_rows`
    receives the table so far after every chunk (on rank 0).
    Under torchrun each process certifies its share of every chunk and rank 0 gathers the
    rows: noise is keyed by example, so the table equals one process's.
    """
    from .examples import InMemory

    data = InMemory(*data) if isinstance(data, tuple) else data
    device = next(smooth.base_classifier.parameters()).device
    rows: dict[str, list] = {k: list(v) for k, v in (done or {k: np.zeros(0) for k in ROWS}).items()}
    rows.setdefault("samples", [n0 + n] * len(rows["idx"]))
    finished = {int(i) for i in rows["idx"]}
    todo = [int(i) for i in indices if int(i) not in finished]
    world, rank = distributed.world_size(), distributed.rank()
    per_image = n0 + (n if grid is None else rounds(n)[0])  # an adaptive image often stops after its first look
    chunk = max(1, math.ceil(8 * batch_size / per_image)) * world  # >= 8 full forward batches per process
    starts = range(0, len(todo), chunk)
    for start in progress(starts, len(starts), f"certify (sigma={smooth.sigma:g})"):
        part = todo[start : start + chunk]
        mine = part[distributed.shard(len(part))]
        x, y = data.take(mine)
        with Timer(device) as timer:
            if grid is None:
                cert: Certificate | GridCertificate = smooth.certify_batch(x, n0, n, alpha, batch_size, indices=mine)
                samples = np.full(len(mine), n0 + n)
            else:
                cert = graded = smooth.certify_grid(x, grid, n0, n, alpha, batch_size, indices=mine, futility=futility)
                samples = graded.samples
        columns = [
            mine,
            y.numpy(),
            cert.prediction,
            cert.radius,
            cert.prediction == y.numpy(),
            np.full(len(mine), timer.seconds / len(part)),
            samples,
        ]
        part_rows = torch.tensor(np.stack(columns, 1) if mine else np.zeros((0, len(ROWS))), dtype=torch.float64)
        gathered = distributed.all_gather_rows(part_rows.to(distributed.collective_device())).cpu().numpy()
        for k, column in zip(ROWS, gathered.T):
            rows[k] += column.tolist()
        if save_rows is not None and rank == 0:
            save_rows(_typed(rows))
    out = _typed(rows)
    position = {int(i): j for j, i in enumerate(out["idx"])}
    order = [position[int(i)] for i in indices]
    return {k: v[order] for k, v in out.items()}


def _typed(rows: dict[str, list]) -> dict[str, np.ndarray]:
    types = {
        "idx": np.int64,
        "label": np.int64,
        "predict": np.int64,
        "radius": np.float64,
        "correct": bool,
        "time_s": np.float64,
        "samples": np.int64,
    }
    return {k: np.asarray(rows[k], dtype=types[k]) for k in ROWS}


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Fraction of ALL examples that are correct and certified at radius >= r, for each r.
    Abstentions are never correct, so they count as wrong."""
    radius, correct = np.asarray(radius), np.asarray(correct, dtype=bool)
    return np.array([float(np.mean(correct & (radius >= r))) for r in np.asarray(radii)])


def average_certified_radius(radius: np.ndarray, correct: np.ndarray) -> float:
    """Mean over examples of the radius when correct, else 0 (ACR)."""
    return float(np.mean(np.where(np.asarray(correct, dtype=bool), radius, 0.0)))


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The radius CERTIFY returns when all n samples vote for the top class: no larger one is
    possible with this n and alpha (2.46 sigma at n = 1,000 and 3.81 sigma at n = 100,000
    for alpha = 0.001)."""
    p = float(lower_confidence_bound(n, n, alpha))
    return sigma * float(norm.ppf(p)) if p > 0.5 else 0.0


def radius_grid(top: float, points: int = 201) -> np.ndarray:
    """Evenly spaced radii from 0 to 10% beyond `top`: where a certified-accuracy curve is drawn."""
    return np.linspace(0.0, max(top, 1e-3) * 1.1, points)
