"""The candidates of coefficient learning: the evaluated path, and which candidate is kept.

Every evaluation (the zero-shot model, the initialisation, then every ``eval_every`` steps or
every epoch) makes a *candidate*: its step, coefficients, per-dataset statistics (label-free
ones always; accuracy where the protocol's selection may read labels; the audit accuracy where
one was asked for, never used to select), its selection score and, for the label-free rule,
why it was rejected. :class:`Candidates` keeps them in order and tracks the protocol's choice:

* ``held-out`` / ``val-split`` -- the best score (:func:`~tvtool.atlas.objectives.
  selection_score`), an earlier candidate winning ties;
* ``last`` -- the last candidate (AdaMerging keeps its last iterate).

It also says when the choice is the first or the last candidate (``at_edge``): the first
means learning never beat the starting point, the last that more steps might have helped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from tvtool.atlas.objectives import (
    UNLABELLED,
    TaskScore,
    collapse_reasons,
    selection_score,
)

Score = tuple[float, float, float]


@dataclass
class Candidate:
    """One evaluated point of the learning path.

    Attributes:
        step: Training step (0: the initialisation, −1: the zero-shot model when the
            initialisation is not 0).
        coefficients: The (effective) coefficient matrix, CPU float32.
        loss: Mean training loss since the previous evaluation (None before training).
        scores: Per-dataset statistics of the selection data.
        score: The selection score (None without selection data).
        rejected: Why the label-free guard rejects it (empty: it does not).
        audit: Per-dataset audit accuracy (labels the selection never reads).
        note: A remark (``zero-shot (all coefficients 0)``).
        candidate: Whether it competed for selection (the zero-shot model is evaluated as
            the collapse guard's reference even when it does not compete).
    """

    step: int
    coefficients: Tensor
    loss: float | None
    scores: list[TaskScore]
    score: Score | None
    rejected: list[str] = field(default_factory=list)
    audit: dict[str, float] = field(default_factory=dict)
    note: str | None = None
    candidate: bool = True

    def record(self, names: Sequence[str]) -> dict[str, Any]:
        """The candidate as a JSON-ready history record (no coefficients)."""
        out: dict[str, Any] = {"step": self.step, "loss": self.loss,
                               "score": list(self.score) if self.score is not None else None}
        if self.note:
            out["note"] = self.note
        if not self.candidate:
            out["candidate"] = False
        if self.scores:
            out["admissible"] = not self.rejected
            out["rejected"] = list(self.rejected)
            out["datasets"] = [{"dataset": name, **_finite(score.record())}
                               for name, score in zip(names, self.scores, strict=True)]
        if self.audit:
            out["audit_accuracy"] = dict(self.audit)
        return out


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN -> None, so the record is valid JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in record.items()}


class Candidates:
    """The learning path and the protocol's choice among it.

    Args:
        objective: The objective (decides the score).
        selection: ``held-out``, ``val-split`` or ``last``.
        names: Names of the datasets with selection data, in score order.
        control_threshold: Negation's share of zero-shot control accuracy to keep.
        ties: Whether the score's tie-break counts (tvtool); the aTLAS references compare the
            primary value alone (``acc > best_acc``).
    """

    def __init__(self, objective: str, selection: str, names: Sequence[str], *,
                 control_threshold: float, ties: bool = True) -> None:
        self.objective = objective
        self.selection = selection
        self.names = list(names)
        self.control_threshold = control_threshold
        self.ties = ties
        self.path: list[Candidate] = []
        self.zero_shot: list[TaskScore] = []
        self.best_index: int | None = None

    def score_of(self, scores: list[TaskScore]) -> Score | None:
        """The selection score of per-dataset statistics (None without statistics)."""
        if not scores:
            return None
        if self.selection == "val-split" and self.objective != "negation":
            # aTLAS keeps the most accurate epoch on the labelled val split, whatever the
            # objective (ufm included): mean accuracy, no tie-break.
            return (1.0, sum(s.accuracy or 0.0 for s in scores) / len(scores), 0.0)
        score = selection_score(self.objective, scores, self.zero_shot or None,
                                control_threshold=self.control_threshold)
        return score if self.ties else (score[0], score[1], 0.0)

    def offer(self, step: int, coefficients: Tensor, loss: float | None,
              scores: list[TaskScore], *, audit: dict[str, float] | None = None,
              candidate: bool = True, note: str | None = None) -> Candidate:
        """Record an evaluation; it competes for selection when ``candidate``.

        Returns:
            The recorded candidate.
        """
        guarded = self.objective in UNLABELLED and self.selection != "val-split"
        rejected = (collapse_reasons(scores, self.zero_shot or None, self.names)
                    if scores and guarded else [])
        entry = Candidate(step, coefficients, loss, scores, self.score_of(scores), rejected,
                          dict(audit or {}), note, candidate)
        self.path.append(entry)
        if not candidate:
            return entry
        index = len(self.path) - 1
        if self.selection == "last" or self.best_index is None:
            self.best_index = index
        elif entry.score is not None:
            best = self.path[self.best_index].score
            if best is None or entry.score > best:
                self.best_index = index
        return entry

    @property
    def best(self) -> Candidate:
        """The chosen candidate."""
        if self.best_index is None:
            raise ValueError("no candidate was offered")
        return self.path[self.best_index]

    @property
    def met_rule(self) -> bool:
        """Whether the chosen candidate satisfies the rule (not collapsed, control kept)."""
        score = self.best.score
        return score is None or score[0] >= 1.0

    def at_edge(self) -> str | None:
        """``first`` or ``last`` when the selection chose an end of the candidates."""
        if self.selection == "last" or self.best_index is None:
            return None
        competing = [i for i, c in enumerate(self.path) if c.candidate and c.score is not None]
        if len(competing) < 2:
            return None
        if self.best_index == competing[0]:
            return "first"
        if self.best_index == competing[-1]:
            return "last"
        return None

    def since_best(self) -> int:
        """Evaluations after the chosen one (early stopping)."""
        return 0 if self.best_index is None else len(self.path) - 1 - self.best_index

    def records(self) -> list[dict[str, Any]]:
        """Every evaluation as a JSON-ready record, in order."""
        return [c.record(self.names) for c in self.path]
