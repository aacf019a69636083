"""Preference objectives on diffusion denoising errors: pure functions of tensors, no model inside.

Every function takes per-pair mean squared denoising errors, shape [B] (one value per pair, the mean over
C, H, W of (prediction - target)^2), for the policy (`model_*`) and the frozen reference (`ref_*`) on the
preferred (`*_w`) and the other (`*_l`) image, and returns the per-pair loss, shape [B]. The caller averages.

Convention (the official Diffusion-DPO code and diffusers' example, not the paper's pseudocode): errors are
per-pixel means, and beta multiplies half the difference, so the paper's beta = 5000 for SDXL keeps its
meaning. IPO and hinge are written on the same logit x as DPO, so beta means the same for all three.

Soft labels: every pair carries p = P(w preferred) (1, 0.5 for a kept tie, or an AI-feedback probability),
mixed with conservative label smoothing by `soft_preference`. The pairwise objectives (dpo, ipo, hinge, mapo)
return their expected loss when the pair's orientation is drawn with probability p: p L(w, l) + (1 - p) L(l, w).
SFT, which never sees the other image, weights the preferred image's error by p.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_preference(labels: Tensor | None, label_smoothing: float, like: Tensor) -> Tensor:
    """Probability that the `w` image is truly preferred: the data's label (1, or 0.5 for a kept tie, or an
    AI-feedback probability) mixed with conservative-DPO smoothing eps: p' = p (1 - eps) + (1 - p) eps."""
    p = torch.ones_like(like) if labels is None else labels.to(like)
    return p * (1.0 - label_smoothing) + (1.0 - p) * label_smoothing


def dpo_logits(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """The DPO logit  -beta/2 * ((e_w - r_w) - (e_l - r_l)): positive when the policy lowered the preferred
    image's error more than the other's, relative to the reference (Wallace et al. 2023, Eq. 14)."""
    return -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))


def diffusion_dpo_loss(
    model_w: Tensor,
    model_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    beta: float,
    labels: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14, in the official code's 0.5 x beta convention):

        L = -log sigmoid(-beta/2 * ((e_w - r_w) - (e_l - r_l)))

    With a soft preference p (see `soft_preference`) the loss is the expected one under the label noise:
        L = -p log sigmoid(x) - (1 - p) log sigmoid(-x),  x = the logit above.
    A fresh adapter (policy == reference) gives x = 0 and L = ln 2 for every pair.
    """
    logits = dpo_logits(model_w, model_l, ref_w, ref_l, beta)
    p = soft_preference(labels, label_smoothing, logits)
    return -(p * F.logsigmoid(logits) + (1.0 - p) * F.logsigmoid(-logits))


def ipo_loss(
    model_w: Tensor,
    model_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    beta: float,
    labels: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    Eq. 17) on diffusion errors: regress the DPO logit x (see `dpo_logits`) onto a fixed margin instead of
    pushing it to infinity:

        L = (x - 1/2)^2,   x = -beta/2 * ((e_w - r_w) - (e_l - r_l))

    This is TRL's `ipo` loss, (h - 1/(2 tau))^2 with the log-ratio difference h and tau = beta, multiplied by
    beta^2: with the official code's convention h = -1/2 ((e_w - r_w) - (e_l - r_l)), so beta h = x and
    beta^2 (h - 1/(2 beta))^2 = (x - 1/2)^2. The factor beta^2 moves neither the minimum nor Adam's direction;
    it puts the gradients on DPO's scale, so DPO's learning rate and clipping carry over. The optimum margin
    is (e_l - r_l) - (e_w - r_w) = 1/beta: larger beta, closer to the reference, as in DPO.

    Soft preference p: the expected loss when the pair's orientation is drawn with probability p,
        L = p (x - 1/2)^2 + (1 - p) (x + 1/2)^2 = (x - (2p - 1)/2)^2 + p (1 - p),
    i.e. the target scaled by 2p - 1 (a tie is regressed to x = 0) plus a constant.
    """
    x = dpo_logits(model_w, model_l, ref_w, ref_l, beta)
    p = soft_preference(labels, label_smoothing, x)
    return p * (x - 0.5).pow(2) + (1.0 - p) * (x + 0.5).pow(2)


def hinge_loss(
    model_w: Tensor,
    model_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    beta: float,
    labels: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SLiC-style hinge (Zhao et al. 2023, "SLiC-HF"; with the reference as in Liu et al. 2023, "Statistical
    Rejection Sampling Improves Preference Optimization"; TRL's `hinge`), on the DPO logit x:

        L = max(0, 1 - x),   x = -beta/2 * ((e_w - r_w) - (e_l - r_l))

    A pair stops contributing once x >= 1, i.e. once its margin reaches 2/beta. TRL writes max(0, 1 - beta h)
    with the log-ratio difference h; here beta h = x as in `ipo_loss`.

    Soft preference p: the expected loss when the pair's orientation is drawn with probability p,
        L = p max(0, 1 - x) + (1 - p) max(0, 1 + x);
    a tie costs a constant 1 while |x| <= 1 and pulls x back only beyond that.
    """
    x = dpo_logits(model_w, model_l, ref_w, ref_l, beta)
    p = soft_preference(labels, label_smoothing, x)
    return p * F.relu(1.0 - x) + (1.0 - p) * F.relu(1.0 + x)


def mapo_score(errors: Tensor, snr: float) -> Tensor:
    """MaPO's likelihood score s(e) = g e / (exp(g e) - 1), g = `snr`: 1 at e = 0, falling as the error grows.
    (expm1 instead of the official exp() - 1: the same function, without cancellation at small g e.)"""
    x = snr * errors
    safe = torch.where(x == 0, torch.ones_like(x), x)  # s(0) = 1 is the limit; keeps 0/0 out of the gradient
    return torch.where(x == 0, torch.ones_like(x), safe / torch.expm1(safe))


def mapo_loss(
    model_w: Tensor,
    model_l: Tensor,
    beta: float,
    snr: float,
    num_timesteps: int,
    labels: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """MaPO (Hong et al. 2024, "Margin-aware Preference Optimization for Aligning Diffusion Models without
    Reference"), reference-free, exactly as the official code's `compute_loss` (github.com/mapo-t2i/mapo,
    utils.py), per pair:

        L = e_w - beta * log sigmoid(T * (s(e_w) - s(e_l))),   s(e) = g e / (exp(g e) - 1)

    with T the scheduler's num_train_timesteps (1000), defaults beta = 0.1 (`--beta_mapo`) and g = 0.5
    (`--snr_value`). The official loss, mean(e_w) - beta * mean(log sigmoid(...)), is the batch mean of this.
    It agrees with the anchors' formula; the code's only difference from it is exp() - 1 (see `mapo_score`).

    Soft preference p (not in the official code, which drops ties): the expected loss when the pair's
    orientation is drawn with probability p,
        L = p e_w + (1 - p) e_l - beta * (p log sigmoid(m) + (1 - p) log sigmoid(-m)),  m = T (s(e_w) - s(e_l));
    a tie fits both images equally and pulls the margin to 0.
    """
    margin = num_timesteps * (mapo_score(model_w, snr) - mapo_score(model_l, snr))
    p = soft_preference(labels, label_smoothing, margin)
    likelihood = p * model_w + (1.0 - p) * model_l
    return likelihood - beta * (p * F.logsigmoid(margin) + (1.0 - p) * F.logsigmoid(-margin))


def sft_loss(model_w: Tensor, labels: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Supervised fine-tuning on the preferred image only (the paper's SFT baseline): L = p e_w.

    Soft preference p weights the pair: a kept tie counts half. (The expected loss would add (1 - p) e_l, but
    that needs the second forward this objective exists to skip.) With hard labels and no smoothing, L = e_w.
    """
    return soft_preference(labels, label_smoothing, model_w) * model_w


@dataclass(frozen=True)
class Objective:
    """A loss and the denoising errors it needs, so the step never runs a forward it would not use. How the
    recipe's [objective] keys become the loss's arguments is the step's business (`step.objective_loss`)."""

    loss: Callable[..., Tensor]
    needs_reference: bool
    needs_loser: bool


OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(diffusion_dpo_loss, needs_reference=True, needs_loser=True),
    "ipo": Objective(ipo_loss, needs_reference=True, needs_loser=True),
    "hinge": Objective(hinge_loss, needs_reference=True, needs_loser=True),
    "mapo": Objective(mapo_loss, needs_reference=False, needs_loser=True),
    "sft": Objective(sft_loss, needs_reference=False, needs_loser=False),
}


def get_objective(kind: str) -> Objective:
    if kind not in OBJECTIVES:
        raise ValueError(f"objective {kind!r} is not implemented; available: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind]


def _win_fraction(margin: Tensor, labels: Tensor | None = None) -> Tensor:
    """How far the sign of `margin` (> 0: w preferred) agrees with the label p = P(w preferred): p when it
    prefers w, 1 - p when it prefers l, 0.5 on an exact tie. Hard labels (p = 1) give plain accuracy; a kept
    tie (p = 0.5) counts 0.5 whatever the model says, so ties never inflate the score."""
    wins = (margin > 0).float() + 0.5 * (margin == 0).float()
    if labels is None:
        return wins
    p = labels.to(wins)
    return p * wins + (1.0 - p) * (1.0 - wins)


def implicit_reward_accuracy(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor,
                             labels: Tensor | None = None) -> Tensor:
    """Per pair: 1 when the implied reward prefers w ((e_w - r_w) < (e_l - r_l)), 0 when it prefers l,
    0.5 on an exact tie (as diffusers counts it; every pair is a tie before training); with soft labels, the
    agreement with the label (see `_win_fraction`)."""
    return _win_fraction((model_l - ref_l) - (model_w - ref_w), labels)


def error_accuracy(model_w: Tensor, model_l: Tensor, labels: Tensor | None = None) -> Tensor:
    """Per pair: 1 when the policy denoises the preferred image with the lower error (e_w < e_l), 0.5 on a
    tie. Needs no reference, so it exists for MaPO too; unlike reward accuracy it does not start at 0.5: it
    carries the base model's own bias between the two images, so read it against its value at step 0."""
    return _win_fraction(model_l - model_w, labels)
