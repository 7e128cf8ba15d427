"""Attacks on [0, 1] images with the normalization inside the model (eps in pixel units), in
eval mode: PGD (Madry et al.) and the standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square),
one small module each, and the robustness evaluation that runs them."""

from ..configs import ATTACKS, AutoAttackConfig, PGDConfig
from .autoattack import autoattack
from .evaluate import RobustnessResult, accuracy, classified_right, evaluate_robustness
from .pgd import PGD_STREAM, pgd

__all__ = [
    "ATTACKS",
    "AutoAttackConfig",
    "PGDConfig",
    "PGD_STREAM",
    "RobustnessResult",
    "accuracy",
    "autoattack",
    "classified_right",
    "evaluate_robustness",
    "pgd",
]
