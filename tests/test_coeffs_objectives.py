"""Objectives, selection rules and augmentation of aTLAS coefficient learning, on fixed inputs.

Every expected value is computed here independently, in the style of the reference code
(aTLAS ``learn_ufm.py`` / ``learn_task_negation.py``, SHOT's information maximisation), with
plain Python loops where that keeps the formula obvious.
"""

from __future__ import annotations

import math

import pytest
import torch

from tvtool.atlas.augment import augment, crop_box
from tvtool.atlas.learner import LearnerConfig
from tvtool.atlas.objectives import (
    TaskOutput,
    TaskScore,
    infomax_loss,
    loss,
    selection_score,
    ufm_loss,
)
from tvtool.atlas.protocols import DEFAULTS
from tvtool.atlas.ufm import trusted_subset
from tvtool.errors import UsageError

LOGITS = torch.tensor([[2.0, 0.5, -1.0],
                       [0.1, 0.2, 0.3],
                       [5.0, -3.0, 0.0],
                       [-1.0, 4.0, 1.0]])


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def _entropy(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def test_infomax_is_mean_entropy_minus_entropy_of_the_mean():
    probs = [_softmax(row) for row in LOGITS.tolist()]
    mean = [sum(p[c] for p in probs) / len(probs) for c in range(3)]
    expected = sum(_entropy(p) for p in probs) / len(probs) - _entropy(mean)
    assert float(infomax_loss(LOGITS)) == pytest.approx(expected, abs=1e-6)
    # A collapsed batch (every row predicts class 0 with certainty) scores 0, a confident
    # and balanced one about −log C: the loss prefers the balanced one.
    collapsed = torch.tensor([[30.0, 0.0, 0.0]] * 3)
    balanced = 30 * torch.eye(3)
    assert float(infomax_loss(collapsed)) == pytest.approx(0.0, abs=1e-6)
    assert float(infomax_loss(balanced)) == pytest.approx(-math.log(3), abs=1e-6)


def _reference_ufm(plain, strong, pseudo, trusted, thresh):
    """``ssl_loss_trusted`` of learn_ufm.py, written out per example."""
    total, count = 0.0, 0.0
    for i in range(len(plain)):
        guess = _softmax(plain[i])
        guess = [g * 0.5 for g in guess]
        guess = [g / sum(guess) for g in guess]  # the reference's no-op "sharpening"
        if trusted[i]:
            guess = [1.0 if c == pseudo[i] else 0.0 for c in range(len(guess))]
        weight = 1.0 if max(guess) > thresh else 0.0
        logp = [math.log(q) for q in _softmax(strong[i])]
        total += weight * -sum(g * lp for g, lp in zip(guess, logp, strict=True))
        count += weight
    return total / count


def test_ufm_loss_matches_the_reference_formula():
    plain = torch.tensor([[9.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 8.0, 1.0], [1.0, 1.0, 1.0]])
    strong = LOGITS
    pseudo = torch.tensor([0, 2, 1, 1])
    trusted = torch.tensor([False, False, False, True])
    for thresh in (0.5, 0.9, 0.99):
        expected = _reference_ufm(plain.tolist(), strong.tolist(), pseudo.tolist(),
                                  trusted.tolist(), thresh)
        assert float(ufm_loss(plain, strong, pseudo, trusted, thresh)) == \
            pytest.approx(expected, abs=1e-6)
    # No gradient flows through the plain view's targets.
    plain.requires_grad_(True)
    strong = strong.clone().requires_grad_(True)
    ufm_loss(plain, strong, pseudo, trusted, 0.5).backward()
    assert plain.grad is None and strong.grad is not None
    # Nothing confident and nothing trusted: 0, not NaN.
    none = ufm_loss(torch.zeros(2, 3), LOGITS[:2], torch.tensor([0, 1]),
                    torch.tensor([False, False]), 0.99)
    assert float(none) == 0.0


def test_ufm_objective_requires_its_inputs():
    with pytest.raises(UsageError, match="ufm"):
        loss("ufm", [TaskOutput(LOGITS, None)])


def test_negation_losses():
    labels = torch.tensor([0, 2, 0, 1])
    target = TaskOutput(LOGITS, labels, "target")
    control = TaskOutput(LOGITS.flip(0), labels, "control")

    def ce(logits, y):
        return sum(-math.log(_softmax(r)[c]) for r, c in zip(logits, y, strict=True)) / len(y)

    def ul(logits, y):
        return sum(-math.log(1 - _softmax(r)[c]) for r, c in zip(logits, y, strict=True)) \
            / len(y)

    rows, back, ys = LOGITS.tolist(), LOGITS.flip(0).tolist(), labels.tolist()
    # The aTLAS reference: −CE(target) + CE(control).
    assert float(loss("negation", [target, control], negation_loss="ce")) == \
        pytest.approx(-ce(rows, ys) + ce(back, ys), abs=1e-5)
    assert float(loss("negation", [target, control], 0.5)) == \
        pytest.approx(ce(back, ys) + 0.5 * ul(rows, ys), abs=1e-5)


def _score(role="train", accuracy=None, entropy=0.5, marginal=1.0, classes=1.0):
    return TaskScore(role, 10, accuracy, None, entropy, marginal, classes)


def test_unlabelled_selection_rejects_collapse_and_prefers_information():
    zero_shot = [_score(entropy=1.0, marginal=1.3, classes=1.3)]
    collapsed = [_score(entropy=0.01, marginal=0.02, classes=0.1)]
    healthy = [_score(entropy=0.4, marginal=1.25, classes=1.25)]
    for objective in ("entropy", "infomax", "ufm"):
        scores = {name: selection_score(objective, s, zero_shot)
                  for name, s in (("zs", zero_shot), ("collapsed", collapsed),
                                  ("healthy", healthy))}
        assert scores["collapsed"][0] == 0.0
        assert max(scores, key=scores.__getitem__) == "healthy"
        # Plain "lowest entropy" would have chosen the collapsed model.
        assert collapsed[0].entropy < healthy[0].entropy


def _reference_negation_pick(points, zs_target, zs_control, threshold=0.95):
    """learn_task_negation.py's rule: lowest target accuracy with control >= 95 % of zs."""
    best_acc, best = zs_target, None
    for index, (target, control) in enumerate(points):
        if target < best_acc and control >= zs_control * threshold:
            best_acc, best = target, index
    return best


def test_negation_selection_is_the_reference_rule():
    zs = [TaskScore("target", 10, 0.9, 0.3, 0.5), TaskScore("control", 10, 0.8, 0.4, 0.5)]
    points = [(0.7, 0.79), (0.5, 0.77), (0.2, 0.70), (0.4, 0.78), (0.1, 0.5), (0.5, 0.80)]
    expected = _reference_negation_pick(points, 0.9, 0.8)
    scored = [selection_score("negation", [TaskScore("target", 10, t, 1.0, 0.5),
                                           TaskScore("control", 10, c, 1.0, 0.5)], zs)
              for t, c in points]
    zero_shot_score = selection_score("negation", zs, zs)
    best = max(range(len(points)), key=lambda i: scored[i])
    assert best == expected == 3
    assert scored[best] > zero_shot_score
    assert scored[2][0] == scored[4][0] == 0.0  # control below 95 % of zero-shot


def test_trusted_subset_is_class_balanced_top_k():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(250, 3, generator=generator).softmax(-1)
    k = min(int((250 / 3) / 10), 100)  # learn_ufm.py
    expected: set[int] = set()
    for c in range(3):
        order = sorted(range(250), key=lambda i: float(probabilities[i, c]))
        expected |= set(order[-k:])
    assert set(trusted_subset(probabilities).tolist()) == expected
    assert len(trusted_subset(probabilities[:5])) >= 1  # at least one per class


def test_augmentations():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 16, 16, generator=generator)
    assert augment(images, "none", generator) is images
    for kind in ("train", "reference"):
        out = augment(images, kind, generator)
        assert out.shape == images.shape and torch.isfinite(out).all()
        assert not torch.equal(out, images)
    # Bicubic resampling keeps a constant image constant: crops only move content.
    flat = torch.full((2, 3, 16, 16), 0.7)
    torch.testing.assert_close(augment(flat, "reference", generator), flat)
    # Same seed, same augmentation.
    a = augment(images, "reference", torch.Generator().manual_seed(3))
    b = augment(images, "reference", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    for _ in range(50):
        top, left, h, w = crop_box(20, 30, (0.5, 1.0), generator)
        assert top >= 0 and top + h <= 20 and left >= 0 and left + w <= 30
        assert 0.5 * 600 * 0.9 <= h * w <= 600


def test_defaults_follow_the_references():
    ce = LearnerConfig(objective="ce").resolved()
    assert (ce.lr, ce.weight_decay, ce.grad_clip, ce.augment, ce.init) == \
        (0.1, 0.1, 1.0, "reference", 0.0)
    entropy = LearnerConfig(objective="entropy").resolved()
    assert (entropy.lr, entropy.init, entropy.weight_decay) == (1e-3, 0.3, 0.0)
    assert LearnerConfig(objective="ufm").resolved().lr == 1e-3
    assert LearnerConfig(objective="negation", lr=0.2).resolved().lr == 0.2
    assert {objective for _, objective in DEFAULTS} == {"ce", "entropy", "infomax", "ufm",
                                                         "negation"}
    assert {objective for protocol, objective in DEFAULTS if protocol == "tvtool"} == \
        {"ce", "entropy", "infomax", "ufm", "negation"}
    with pytest.raises(UsageError, match="augmentation"):
        LearnerConfig(augment="heavy").check()
    with pytest.raises(UsageError, match="--control-threshold"):
        LearnerConfig(objective="negation", control_threshold=1.5).check()
