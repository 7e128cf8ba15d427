"""Training the base classifier of a smoothed classifier for larger certified radii.

CERTIFY's guarantee holds for any base classifier f; these methods only make f's votes under
noise more confident, so the same CERTIFY returns larger radii. Each is a `Perturbation` with
its own objective (training.train calls `objective`), and each noise draw is keyed by
(seed, step), so runs resume bit for bit and split over processes as Gaussian training does.

- Consistency regularization (Jeong and Shin, NeurIPS 2020): m noisy copies per image; the mean
  cross-entropy, plus lambda times the mean KL(p_bar || p_i) of each copy's softmax p_i from
  their mean p_bar, plus eta times the entropy of p_bar. This is the authors' "default" loss,
  with which their paper's figures were made (their README notes that its entropy term differs
  from the written cross-entropy form, which equals it when eta = lambda).
- SmoothAdv (Salman et al., NeurIPS 2019): L2 PGD against the soft smoothed classifier, its
  probabilities estimated from m noise draws that stay fixed through the attack ("multi-noise"):
  normalized-gradient steps of 2 eps / steps from x, each followed by a clamp to the image and
  a projection to the eps-ball; then cross-entropy on the m points x' + delta_i. eps grows
  linearly over the first `warmup` passes, as in the authors' code. Here every image of a
  minibatch gets m copies in one SGD step (the authors split a batch into m chunks instead).
- MACER (Zhai et al., ICLR 2020): k draws per image; -log of the soft smoothed classifier's
  probability of the label, plus lambda * sigma / 2 times the hinge max(0, gamma - xi) on the
  correctly classified points, xi = Phi^-1(G_y) - Phi^-1(max_{c != y} G_c) computed from
  softmax(beta * logits) averaged over the draws (the batch's mean of both terms). Optionally
  deferred: lambda is 0 for the first epochs, as the authors' MNIST runs start it after the first
  learning-rate drop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import check_consistency, check_macer, check_noise, check_smoothadv
from .perturbations import Batch, Perturbation, noise_draws
from .runtime import autocast

PROBABILITY_FLOOR = 1e-6  # MACER: G is kept in [floor, 1 - floor] before Phi^-1 (|Phi^-1| <= 4.75)


def forward_copies(net: nn.Module, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Logits (copies, B, K) of the noisy copies x + noise[i], in one forward pass."""
    copies, b = noise.shape[:2]
    with autocast(x.device):
        logits = net((x[None] + noise).flatten(0, 1))
    return logits.float().view(copies, b, -1)


# ---------------------------------------------------------------- the three losses


def consistency_loss(
    logits: torch.Tensor, y: torch.Tensor, lam: float, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-example KL term, per-example entropy term) of consistency regularization from
    the logits (m, B, K) of m noisy copies: mean cross-entropy + mean over the batch of
    lam * mean_i KL(p_bar || p_i) + eta * H(p_bar)."""
    m = logits.shape[0]
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(m))
    log_p = F.log_softmax(logits, -1)
    p_bar = log_p.exp().mean(0)
    kl = F.kl_div(log_p, p_bar.expand_as(log_p), reduction="none").sum(-1).mean(0)
    entropy = -(p_bar * p_bar.clamp_min(1e-20).log()).sum(-1)
    return ce + (lam * kl + eta * entropy).mean(), kl, entropy


def soft_smoothed_nll(logits: torch.Tensor, y: torch.Tensor, floor: float = 1e-20) -> torch.Tensor:
    """Per example -log G(x)_y, G the mean softmax over the copies (logits (m, B, K))."""
    p_bar = F.softmax(logits, -1).mean(0)
    return -p_bar.gather(1, y[:, None])[:, 0].clamp_min(floor).log()


def smoothadv_attack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, eps: float, steps: int
) -> torch.Tensor:
    """SmoothAdv's multi-noise L2 PGD: x' in the eps-ball around x (and in [0, 1]) that raises
    -log G(x')_y, G estimated from the fixed draws `noise` (m, B, C, H, W). Starts at x; each
    step moves 2 eps / steps along the per-example normalized gradient, clamps to the image and
    projects to the ball. The model's parameters get no gradient."""
    delta = torch.zeros_like(x)
    if eps <= 0 or steps < 1:
        return x
    step = 2 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = soft_smoothed_nll(forward_copies(model, x + delta, noise), y).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            delta = (x + delta + step * grad / norms).clamp(0, 1) - x
            length = delta.flatten(1).norm(dim=1).view_as(norms)
            delta = delta * (eps / length.clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).detach()


def macer_margin(logits: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(xi, top class) of MACER's robustness term from logits (k, B, K): G = mean softmax of
    beta * logits, xi = Phi^-1(top G) - Phi^-1(second G), both clamped into [floor, 1 - floor]."""
    g = F.softmax(beta * logits, -1).mean(0)
    top2 = g.topk(2, dim=-1)
    clamped = top2.values.clamp(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    xi = torch.special.ndtri(clamped[:, 0]) - torch.special.ndtri(clamped[:, 1])
    return xi, top2.indices[:, 0]


def macer_hinge(logits: torch.Tensor, y: torch.Tensor, sigma: float, beta: float, gamma: float) -> torch.Tensor:
    """Per example sigma / 2 * max(0, gamma - xi) where the soft smoothed classifier is right
    (0 elsewhere): points certified beyond gamma (in units of sigma / 2) cost nothing."""
    xi, top = macer_margin(logits, beta)
    active = (top == y) & (xi <= gamma)
    return torch.where(active, sigma / 2 * (gamma - xi), torch.zeros_like(xi))


def macer_loss(
    logits: torch.Tensor, y: torch.Tensor, sigma: float, beta: float, gamma: float, lam: float
) -> torch.Tensor:
    """MACER's objective from logits (k, B, K): mean -log G(x)_y + lam * mean hinge."""
    nll = soft_smoothed_nll(logits, y, floor=1e-10)
    return nll.mean() + lam * macer_hinge(logits, y, sigma, beta, gamma).mean()


# ---------------------------------------------------------------- as training methods


class _NoisyCopies(Perturbation):
    """Training on `copies` Gaussian-noise draws of every image per SGD step, with its own loss."""

    replays = 1

    def __init__(self, sigma: float, copies: int, seed: int):
        check_noise(sigma, copies)
        self.sigma, self.copies, self.seed = sigma, copies, seed
        self.passes_per_step = copies

    def noise(self, batch: Batch) -> torch.Tensor:
        """This step's draws, (copies, B, C, H, W)."""
        return noise_draws(batch, self.copies, self.sigma, self.seed)

    def labels(self, batch: Batch) -> torch.Tensor:
        """The labels of the copies, in the order of forward_copies(...).flatten(0, 1)."""
        return batch.y.repeat(self.copies)


class Consistency(_NoisyCopies):
    """Consistency regularization: m noisy copies per image, the loss of consistency_loss."""

    name = "consistency"

    def __init__(self, sigma: float, m: int = 2, lam: float = 10.0, eta: float = 0.5, seed: int = 0):
        check_consistency(m, lam, eta)
        super().__init__(sigma, m, seed)
        self.lam, self.eta = lam, eta

    def objective(self, net, model, batch):
        logits = forward_copies(net, batch.x, self.noise(batch))
        loss, _, _ = consistency_loss(logits, batch.y, self.lam, self.eta)
        return loss, logits.flatten(0, 1), self.labels(batch)


class SmoothAdv(_NoisyCopies):
    """SmoothAdv: cross-entropy on the m noisy copies of smoothadv_attack's adversarial images."""

    name = "smoothadv"

    def __init__(self, sigma: float, eps: float = 1.0, steps: int = 10, m: int = 1, warmup: int = 1, seed: int = 0):
        check_smoothadv(eps, steps, warmup)
        super().__init__(sigma, m, seed)
        self.eps, self.steps, self.warmup = eps, steps, warmup
        self.passes_per_step = (steps + 1) * m

    def eps_at(self, pass_index: int) -> float:
        """The attack's radius in pass `pass_index` (0-based): eps * min(1, (pass + 1) / warmup)."""
        return self.eps * min(1.0, (pass_index + 1) / self.warmup)

    def objective(self, net, model, batch):
        noise = self.noise(batch)
        was_training = model.training
        model.eval()  # the attack sees the model as it is, and leaves the norm statistics alone
        x_adv = smoothadv_attack(model, batch.x, batch.y, noise, self.eps_at(batch.pass_index), self.steps)
        model.train(was_training)
        logits, y = forward_copies(net, x_adv, noise).flatten(0, 1), self.labels(batch)
        return F.cross_entropy(logits, y), logits, y


class Macer(_NoisyCopies):
    """MACER: macer_loss on k noisy copies per image."""

    name = "macer"

    def __init__(
        self,
        sigma: float,
        k: int = 16,
        beta: float = 16.0,
        gamma: float = 8.0,
        lam: float = 12.0,
        seed: int = 0,
        deferred: int = 0,
    ):
        check_macer(beta, gamma, lam, deferred)
        super().__init__(sigma, k, seed)
        self.beta, self.gamma, self.lam, self.deferred = beta, gamma, lam, deferred

    def lam_at(self, pass_index: int) -> float:
        """The radius term's weight in pass `pass_index` (0-based): 0 for the first `deferred` passes."""
        return 0.0 if pass_index < self.deferred else self.lam

    def objective(self, net, model, batch):
        logits = forward_copies(net, batch.x, self.noise(batch))
        loss = macer_loss(logits, batch.y, self.sigma, self.beta, self.gamma, self.lam_at(batch.pass_index))
        return loss, logits.flatten(0, 1), self.labels(batch)
