"""The search evaluator reads each split's images once and keeps them, within one byte budget
for all splits: the same accuracies as re-reading every split at every coefficient."""

from __future__ import annotations

import pytest

import tvtool.evaluate.batches as batches_module
from tests.conftest import count_calls
from tvtool.evaluate import EvalSettings
from tvtool.workflows.evaluator import Evaluator

D1, D2 = "synthetic:shape", "synthetic:color"
COEFS = (0.0, 0.5, 1.0, 1.5, 3.0)


def _settings(files):
    return EvalSettings(base=files["base"], batch_size=10, device="cpu", limit=24)


@pytest.fixture
def loaders(monkeypatch):
    """Count the DataLoaders built: one per split read from its dataset."""
    return count_calls(monkeypatch, batches_module, "DataLoader")


def _accuracies(evaluator):
    return [evaluator.accuracies([alpha], "val") for alpha in COEFS]


def test_each_split_is_read_once_and_accuracies_equal_re_reading(files, loaders):
    with Evaluator(_settings(files), [files["tv1"]], [D1, D2], splits=("val",),
                   materialize_bytes=0) as rereading:
        before = loaders["n"]
        expected = _accuracies(rereading)
        assert loaders["n"] - before == 2 * len(COEFS)  # every call reads both splits
        assert all(d.materialized_bytes == 0 for d in rereading.opened("val").values())
    with Evaluator(_settings(files), [files["tv1"]], [D1, D2], splits=("val",)) as keeping:
        before = loaders["n"]
        got = _accuracies(keeping)
        assert loaders["n"] - before == 2  # the first call only
        assert all(d.materialized_bytes > 0 for d in keeping.opened("val").values())
    assert got == expected
    assert len({tuple(a.values()) for a in expected}) > 1  # the coefficients do move them


def test_the_budget_is_shared_by_all_splits(files, loaders):
    with Evaluator(_settings(files), [files["tv1"]], [D1], splits=("val",)) as one:
        one.accuracies([1.0], "val")
        split_bytes = one.opened("val")[D1].materialized_bytes
    # Room for one split: the first is kept, the second is read at every call.
    with Evaluator(_settings(files), [files["tv1"]], [D1, D2], splits=("val",),
                   materialize_bytes=split_bytes) as evaluator:
        before = loaders["n"]
        _accuracies(evaluator)
        opened = evaluator.opened("val")
        assert opened[D1].materialized_bytes == split_bytes
        assert opened[D2].materialized_bytes == 0
        assert loaders["n"] - before == 2 + (len(COEFS) - 1)
    # Less room than one split: nothing is kept.
    with Evaluator(_settings(files), [files["tv1"]], [D1], splits=("val",),
                   materialize_bytes=split_bytes - 1) as evaluator:
        before = loaders["n"]
        _accuracies(evaluator)
        assert evaluator.opened("val")[D1].materialized_bytes == 0
        assert loaders["n"] - before == len(COEFS)
