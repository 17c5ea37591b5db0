"""scripts/labelfree_diagnosis.py: its statistics and its table (no model runs)."""

from __future__ import annotations

import itertools
from types import ModuleType

import pytest
import torch

from tests.conftest import load_script


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("labelfree_diagnosis")


def test_auroc_is_the_share_of_correctly_ordered_pairs(script):
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    positives = torch.tensor([False, True, False, True, False])
    pairs = [(p, n) for p, n in itertools.product(range(5), range(5))
             if positives[p] and not positives[n]]
    expected = sum(1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0
                   for p, n in pairs) / len(pairs)
    assert script.auroc(scores, positives) == pytest.approx(expected)


def test_entropy_in_nats(script):
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert float(script.entropy(logits)[0]) == pytest.approx(1.5 * 0.6931471805599453)


def test_render_reports_every_measurement(script):
    path = {"history": [{"accuracy": [0.5, 0.8]}, {"accuracy": [0.6, 0.7]}],
            "spearman_negentropy_vs_accuracy_per_task": [1.0, -1.0],
            "spearman_negentropy_vs_accuracy_average": 0.5,
            "start_average_accuracy": 0.65, "final_average_accuracy": 0.65,
            "final_coefficients": {"mean": 0.4, "at_0": 0.1, "at_1": 0.2}}
    report = {"tasks": ["synthetic:a", "synthetic:b"], "alpha": 0.25, "init": 0.3,
              "per_example_at_task_arithmetic": [
                  {"accuracy": 0.5, "spearman_entropy_vs_loss": 0.9,
                   "auroc_entropy_for_errors": 0.8},
                  {"accuracy": 0.7, "spearman_entropy_vs_loss": 0.1,
                   "auroc_entropy_for_errors": 0.6}],
              "gradients_at_task_arithmetic": {"cosine_per_task": [0.7, 0.1],
                                               "cosine_summed": 0.4},
              "paths": {"entropy": path}}
    text = script.render(report)
    assert "| accuracy (×100) | 50.0 | 70.0 | 60.0 |" in text
    assert "| AUROC of entropy for errors | 0.80 | 0.60 |  |" in text
    assert "| cos(∇ entropy, ∇ labelled CE) over λ | 0.70 | 0.10 | 0.40 |" in text
    # per-task change along the path: +10 and -10 points, average unchanged
    assert "| entropy path: accuracy at step 0 → last (×100, change) | 10.0 | -10.0 | 0.0 |" in text
    assert "10 % at 0, 20 % at 1" in text
