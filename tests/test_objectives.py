import math
import typing

import pytest
import torch

from lora_dpo.objectives import (
    OBJECTIVES,
    diffusion_dpo_loss,
    dpo_logits,
    error_accuracy,
    get_objective,
    hinge_loss,
    implicit_reward_accuracy,
    ipo_loss,
    mapo_loss,
    mapo_score,
    sft_loss,
)
from lora_dpo.recipe import ObjectiveKind, ObjectiveRecipe
from lora_dpo.step import objective_loss


def test_dpo_loss_matches_hand_arithmetic() -> None:
    """e_w = 0.10, e_l = 0.20, r_w = 0.12, r_l = 0.18, beta = 100:
    (e_w - r_w) - (e_l - r_l) = -0.02 - 0.02 = -0.04;  x = -0.5 * 100 * -0.04 = 2.0;
    L = -log sigmoid(2) = log(1 + e^-2) = 0.126928."""
    t = torch.tensor
    loss = diffusion_dpo_loss(t([0.10]), t([0.20]), t([0.12]), t([0.18]), beta=100.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)
    assert loss.item() == pytest.approx(0.126928, abs=1e-6)


def test_dpo_loss_sign_lowering_the_winner_error_lowers_the_loss() -> None:
    t = torch.tensor
    better = diffusion_dpo_loss(t([0.09]), t([0.20]), t([0.10]), t([0.20]), beta=1000.0)
    worse = diffusion_dpo_loss(t([0.11]), t([0.20]), t([0.10]), t([0.20]), beta=1000.0)
    assert better.item() < math.log(2) < worse.item()


def test_dpo_loss_is_ln2_when_policy_equals_reference() -> None:
    errors = torch.rand(5)
    other = torch.rand(5)
    loss = diffusion_dpo_loss(errors, other, errors, other, beta=5000.0)
    torch.testing.assert_close(loss, torch.full((5,), math.log(2)))


def test_label_smoothing_and_soft_labels() -> None:
    """x = 2 as above. Conservative DPO eps = 0.1: L = 0.9 * 0.126928 + 0.1 * 2.126928 = 0.326928.
    A kept tie (label 0.5): L = 0.5 * (0.126928 + 2.126928) = 1.126928, the same for either orientation."""
    t = torch.tensor
    args = (t([0.10]), t([0.20]), t([0.12]), t([0.18]))
    assert diffusion_dpo_loss(*args, beta=100.0, label_smoothing=0.1).item() == pytest.approx(0.326928, abs=1e-6)
    assert diffusion_dpo_loss(*args, beta=100.0, labels=t([0.5])).item() == pytest.approx(1.126928, abs=1e-6)
    assert dpo_logits(*args, beta=100.0).item() == pytest.approx(2.0)


def test_gradient_pushes_winner_error_down() -> None:
    model_w = torch.tensor([0.1], requires_grad=True)
    model_l = torch.tensor([0.2], requires_grad=True)
    diffusion_dpo_loss(model_w, model_l, torch.tensor([0.1]), torch.tensor([0.2]), beta=10.0).sum().backward()
    assert model_w.grad.item() > 0  # descending the loss lowers e_w
    assert model_l.grad.item() < 0  # and raises e_l
    assert model_w.grad.item() == pytest.approx(0.5 * 10.0 * 0.5)  # beta/2 * sigmoid(-0) at the tie


def test_implicit_reward_accuracy_counts_ties_as_half() -> None:
    t = torch.tensor
    acc = implicit_reward_accuracy(t([0.1, 0.3, 0.2]), t([0.2, 0.2, 0.2]), t([0.15, 0.2, 0.2]), t([0.2, 0.2, 0.2]))
    torch.testing.assert_close(acc, t([1.0, 0.0, 0.5]))


def test_sft_is_the_winner_error_and_needs_no_reference() -> None:
    errors = torch.rand(3)
    torch.testing.assert_close(sft_loss(errors), errors)
    assert not get_objective("sft").needs_reference
    assert get_objective("dpo").needs_reference
    with pytest.raises(ValueError, match="available"):
        get_objective("nope")


# The same pair as in the DPO test: e_w = 0.10, e_l = 0.20, r_w = 0.12, r_l = 0.18, so with beta = 100 the
# logit is x = -50 * ((0.10 - 0.12) - (0.20 - 0.18)) = 2.0, and with beta = 10 it is x = 0.2.
PAIR = (0.10, 0.20, 0.12, 0.18)


def _pair(*values: float) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor([v]) for v in values)


def test_ipo_matches_hand_arithmetic() -> None:
    """x = 2: L = (2 - 1/2)^2 = 2.25.
    A kept tie (p = 0.5): 0.5 * (2 - 1/2)^2 + 0.5 * (2 + 1/2)^2 = 0.5 * 2.25 + 0.5 * 6.25 = 4.25.
    AI feedback p = 0.8: 0.8 * 2.25 + 0.2 * 6.25 = 3.05 = (2 - (2*0.8 - 1)/2)^2 + 0.8*0.2 = 1.7^2 + 0.16.
    TRL's form with h = x / beta = 0.02: (0.02 - 1/(2*100))^2 = 0.015^2 = 2.25e-4 = 2.25 / beta^2."""
    args = _pair(*PAIR)
    assert ipo_loss(*args, beta=100.0).item() == pytest.approx(2.25, abs=1e-5)
    assert ipo_loss(*args, beta=100.0, labels=torch.tensor([0.5])).item() == pytest.approx(4.25, abs=1e-5)
    assert ipo_loss(*args, beta=100.0, labels=torch.tensor([0.8])).item() == pytest.approx(3.05, abs=1e-5)
    h = dpo_logits(*args, beta=100.0).item() / 100.0
    assert (h - 1 / (2 * 100.0)) ** 2 * 100.0**2 == pytest.approx(ipo_loss(*args, beta=100.0).item(), rel=1e-4)


def test_ipo_is_minimal_at_the_target_margin_not_beyond() -> None:
    """The optimum logit is x = 1/2, i.e. a margin (e_l - r_l) - (e_w - r_w) = 1/beta = 0.01 at beta 100:
    e_w = 0.095, e_l = 0.2, r_w = 0.1, r_l = 0.2 gives margin 0.005 -> x = 0.25 (too little: L = 0.0625);
    e_w = 0.090 gives x = 0.5 (L = 0); e_w = 0.080 gives x = 1.0 (too much: L = 0.25), unlike DPO."""
    losses = [ipo_loss(*_pair(e_w, 0.2, 0.1, 0.2), beta=100.0).item() for e_w in (0.095, 0.090, 0.080)]
    assert losses == pytest.approx([0.0625, 0.0, 0.25], abs=1e-5)


def test_hinge_matches_hand_arithmetic() -> None:
    """beta = 10, x = 0.2: L = max(0, 1 - 0.2) = 0.8. A tie: 0.5 * max(0, 0.8) + 0.5 * max(0, 1.2) = 1.0.
    beta = 100, x = 2 >= 1: the pair is past the margin, L = 0 and no gradient; with p = 0.8 the flipped
    orientation still costs 0.2 * max(0, 1 + 2) = 0.6."""
    args = _pair(*PAIR)
    assert hinge_loss(*args, beta=10.0).item() == pytest.approx(0.8, abs=1e-5)
    assert hinge_loss(*args, beta=10.0, labels=torch.tensor([0.5])).item() == pytest.approx(1.0, abs=1e-5)
    assert hinge_loss(*args, beta=100.0).item() == 0.0
    assert hinge_loss(*args, beta=100.0, labels=torch.tensor([0.8])).item() == pytest.approx(0.6, abs=1e-5)
    model_w = torch.tensor([0.10], requires_grad=True)
    hinge_loss(model_w, *args[1:], beta=100.0).sum().backward()
    assert model_w.grad.item() == 0.0


def test_mapo_matches_hand_arithmetic() -> None:
    """e_w = 0.100, e_l = 0.104, beta = 0.1, g = 0.5, T = 1000 (the official defaults):
    s(0.100) = 0.05 / (e^0.05 - 1) = 0.05 / 0.0512711 = 0.9752083;  s(0.104) = 0.052 / (e^0.052 - 1) = 0.9742253;
    m = 1000 * (0.9752083 - 0.9742253) = 0.983001;  log sigmoid(m) = -log(1 + e^-0.983001) = -0.317862;
    L = e_w - beta * log sigmoid(m) = 0.1 + 0.0317862 = 0.131786.
    A kept tie: 0.5 * (0.100 + 0.104) - 0.1 * 0.5 * (log sigmoid(m) + log sigmoid(-m))
              = 0.102 - 0.05 * (-0.317862 - 1.300863) = 0.102 + 0.080936 = 0.182936."""
    e_w, e_l = torch.tensor([0.100], dtype=torch.float64), torch.tensor([0.104], dtype=torch.float64)
    assert mapo_score(e_w, 0.5).item() == pytest.approx(0.9752083, abs=1e-7)
    assert mapo_loss(e_w, e_l, 0.1, 0.5, 1000).item() == pytest.approx(0.131786, abs=1e-6)
    tie = mapo_loss(e_w, e_l, 0.1, 0.5, 1000, labels=torch.tensor([0.5]))
    assert tie.item() == pytest.approx(0.182936, abs=1e-6)


def test_mapo_score_is_finite_at_zero_error() -> None:
    errors = torch.tensor([0.0, 1e-3], requires_grad=True)
    score = mapo_score(errors, 0.5)
    score.sum().backward()
    assert score[0].item() == 1.0 and score[1].item() == pytest.approx(1 - 0.25e-3, abs=1e-7)
    assert torch.isfinite(errors.grad).all()


def test_sft_weights_the_winner_by_its_soft_label() -> None:
    """e_w = 0.3: a sure pair costs 0.3, a kept tie 0.5 * 0.3 = 0.15, and smoothing 0.1 turns p = 1 into 0.9."""
    e_w = torch.tensor([0.3, 0.3])
    torch.testing.assert_close(sft_loss(e_w, torch.tensor([1.0, 0.5])), torch.tensor([0.3, 0.15]))
    torch.testing.assert_close(sft_loss(e_w, label_smoothing=0.1), torch.tensor([0.27, 0.27]))


def _call(kind: str, model_w: torch.Tensor, model_l: torch.Tensor, labels: torch.Tensor | None,
          ref: tuple[float, float] = (0.1, 0.2)) -> torch.Tensor:
    cfg = ObjectiveRecipe(kind=kind, beta=100.0)
    objective = get_objective(kind)
    ref_w, ref_l = (torch.full_like(model_w, ref[0]), torch.full_like(model_l, ref[1])) \
        if objective.needs_reference else (None, None)
    return objective_loss(cfg, model_w, model_l if objective.needs_loser else None, ref_w, ref_l, labels, 1000)


@pytest.mark.parametrize("kind", list(OBJECTIVES))
def test_every_objective_pushes_the_winner_error_down_and_the_other_up(kind: str) -> None:
    """At policy == reference (e = r), descending any objective lowers e_w; the pairwise ones raise e_l."""
    model_w = torch.tensor([0.1], requires_grad=True)
    model_l = torch.tensor([0.2], requires_grad=True)
    _call(kind, model_w, model_l, None).sum().backward()
    assert model_w.grad.item() > 0
    if get_objective(kind).needs_loser:
        assert model_l.grad.item() < 0
    else:
        assert model_l.grad is None


@pytest.mark.parametrize("kind", [k for k, o in OBJECTIVES.items() if o.needs_loser])
def test_soft_labels_are_the_expected_loss_over_the_orientation(kind: str) -> None:
    """For every pairwise objective, a pair (w, l) with label p costs exactly what (l, w) with 1 - p costs,
    p = 1 is the hard-label loss, and a tie is symmetric: swapping its images changes nothing."""
    e_w, e_l = torch.tensor([0.11, 0.09]), torch.tensor([0.2, 0.21])
    p = torch.tensor([0.8, 0.5])
    forward = _call(kind, e_w, e_l, p)
    swapped = _call(kind, e_l, e_w, 1 - p, ref=(0.2, 0.1))
    torch.testing.assert_close(forward, swapped)
    torch.testing.assert_close(_call(kind, e_w, e_l, torch.ones(2)), _call(kind, e_w, e_l, None))
    hard = _call(kind, e_w, e_l, None)
    assert forward[0] != hard[0]  # the label matters


def test_objectives_declare_the_forwards_they_need() -> None:
    assert set(typing.get_args(ObjectiveKind)) == set(OBJECTIVES)  # every recipe choice is implemented
    needs = {kind: (o.needs_reference, o.needs_loser) for kind, o in OBJECTIVES.items()}
    assert needs == {"dpo": (True, True), "ipo": (True, True), "hinge": (True, True), "mapo": (False, True),
                     "sft": (False, False)}


def test_error_accuracy_needs_no_reference() -> None:
    t = torch.tensor
    torch.testing.assert_close(error_accuracy(t([0.1, 0.3, 0.2]), t([0.2, 0.2, 0.2])), t([1.0, 0.0, 0.5]))


def test_accuracy_agrees_with_soft_labels() -> None:
    """margins w-preferred, l-preferred, tie; labels 1, 0.5 (a kept tie), 0.8:
    agreement = p*win + (1-p)*(1-win): [1*1, 0.5*0 + 0.5*1, 0.8*0.5 + 0.2*0.5] = [1, 0.5, 0.5]."""
    t = torch.tensor
    acc = implicit_reward_accuracy(t([0.1, 0.3, 0.2]), t([0.2, 0.2, 0.2]), t([0.15, 0.2, 0.2]), t([0.2, 0.2, 0.2]),
                                   labels=t([1.0, 0.5, 0.8]))
    torch.testing.assert_close(acc, t([1.0, 0.5, 0.5]))


def test_the_losses_depend_on_torch_alone() -> None:
    """The objectives module is pure tensor math: it imports nothing of lora-dpo (the recipe's keys become loss
    arguments in the step), so a loss can be read, tested and reused without the rest of the package."""
    import ast
    from pathlib import Path

    import lora_dpo.objectives as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert {name.split(".")[0] for name in imported} <= {"__future__", "collections", "dataclasses", "torch"}
