"""The settings of aTLAS coefficient learning: :class:`LearnerConfig`.

Every field left at None takes the protocol's default for the objective
(:mod:`tvtool.atlas.protocols`); :meth:`LearnerConfig.resolved` fills them in and
:meth:`LearnerConfig.check` validates them. The learner (:mod:`tvtool.atlas.learner`) and the
``learn-coeffs`` workflow hold one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, cast

from tvtool.atlas.objectives import (
    AUGMENTATIONS,
    DEFAULT_CONTROL_THRESHOLD,
    DEFAULT_UFM_THRESHOLD,
    NEGATION_LOSSES,
    check_objective,
)
from tvtool.atlas.protocols import SCHEDULES, UFM_READINGS, defaults_for, resolve_protocol
from tvtool.device import check_precision
from tvtool.errors import UsageError


@dataclass(frozen=True)
class LearnerConfig:
    """Hyper-parameters of coefficient learning.

    Fields left at None take the protocol's default for the objective
    (:data:`tvtool.atlas.protocols.DEFAULTS`, each from the objective's reference code);
    :meth:`resolved` fills them in.

    Attributes:
        objective: ``ce``, ``entropy``, ``infomax``, ``ufm`` or ``negation`` (see
            :mod:`tvtool.atlas.objectives`).
        protocol: ``adamerging``, ``atlas`` or ``tvtool`` (None: the objective's reference
            protocol, :data:`tvtool.atlas.protocols.DEFAULT_PROTOCOL`).
        steps: Optimisation steps (``atlas``: None trains ``epochs`` epochs).
        epochs: Epochs over the training examples (``atlas`` only).
        lr: Learning rate (AdamW).
        weight_decay: AdamW weight decay (pulls coefficients towards 0).
        batch_size: Examples per step, split evenly across the datasets (``adamerging``: each
            dataset's batch, drawn twice per step).
        eval_every: Steps between evaluations (None: the protocol's -- every epoch for
            ``atlas``, the last step for ``adamerging``, 10 for ``tvtool``).
        patience: Stop after this many evaluations without improvement (None: never).
        negation_weight: Weight of the target term of the ``negation`` objective.
        negation_loss: ``unlikelihood`` or ``ce`` (the reference's ``−CE``).
        control_threshold: ``negation``: a candidate must keep this fraction of the zero-shot
            control accuracy (reference: 0.95).
        ufm_threshold: ``ufm``: confidence a soft target needs to count (reference: 0.99).
        ufm_reading: ``ufm``: ``code`` (every example trusted, as learn_ufm.py runs) or
            ``paper`` (a class-balanced trusted subset, the rest thresholded).
        init: Initial value of every coefficient.
        grad_clip: Maximum gradient norm of the coefficients (0: no clipping).
        augment: ``none``, ``train`` or ``reference`` (see
            :class:`~tvtool.atlas.protocols.ObjectiveDefaults`); for ``ufm`` the strong
            view's augmentation.
        schedule: ``cosine`` or ``constant`` learning rate.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast for the encoder's forward
            pass; :func:`learn` resolves ``auto`` for the encoder's device
            (:func:`tvtool.device.resolve_precision`) and records the resolved name.
        seed: Seed of the batch order and the augmentations.
        workers: DataLoader worker processes for data that is not kept in memory.
    """

    objective: str = "ce"
    protocol: str | None = None
    steps: int | None = None
    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    eval_every: int | None = None
    patience: int | None = None
    negation_weight: float = 1.0
    negation_loss: str | None = None
    control_threshold: float = DEFAULT_CONTROL_THRESHOLD
    ufm_threshold: float = DEFAULT_UFM_THRESHOLD
    ufm_reading: str | None = None
    init: float | None = None
    grad_clip: float | None = None
    augment: str | None = None
    schedule: str | None = None
    precision: str = "auto"
    seed: int = 0
    workers: int = 0

    def resolved(self) -> LearnerConfig:
        """This configuration with the protocol and every None default filled in.

        ``steps`` stays None under ``atlas`` when it trains by epochs (the number follows from
        the data; :func:`learn` records it); ``eval_every`` stays None where the protocol
        evaluates per epoch (``atlas``) or at the end only (``adamerging``).

        Raises:
            UsageError: an unknown objective or protocol, or a protocol that does not run the
                objective.
        """
        check_objective(self.objective)
        protocol = resolve_protocol(self.objective, self.protocol)
        default = defaults_for(self.objective, protocol)

        def pick(value: Any, fallback: Any) -> Any:
            return fallback if value is None else value

        return dataclasses.replace(
            self, protocol=protocol,
            steps=self.steps if self.steps is not None else default.steps,
            epochs=pick(self.epochs, default.epochs) if protocol == "atlas" else self.epochs,
            lr=pick(self.lr, default.lr),
            weight_decay=pick(self.weight_decay, default.weight_decay),
            batch_size=pick(self.batch_size, default.batch_size),
            eval_every=pick(self.eval_every, default.eval_every),
            negation_loss=pick(self.negation_loss, default.negation_loss),
            ufm_reading=pick(self.ufm_reading, default.ufm_reading),
            init=pick(self.init, default.init),
            grad_clip=pick(self.grad_clip, default.grad_clip or 0.0),
            augment=pick(self.augment, default.augment),
            schedule=pick(self.schedule, default.schedule))

    def check(self) -> None:
        """Validate the values (after :meth:`resolved`; None fields are checked as defaults).

        Raises:
            UsageError: naming the first bad value.
        """
        config = self.resolved()
        if config.steps is not None and config.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {config.steps}")
        if config.epochs is not None:
            if config.protocol != "atlas":
                raise UsageError("--epochs is the atlas protocol's; the others count --steps")
            if config.epochs < 1:
                raise UsageError(f"--epochs must be at least 1, got {config.epochs}")
        lr = cast(float, config.lr)
        if not lr > 0 or not math.isfinite(lr):
            raise UsageError(f"--lr must be positive, got {lr}")
        if not cast(float, config.weight_decay) >= 0:
            raise UsageError(f"--weight-decay must be >= 0, got {config.weight_decay}")
        if not math.isfinite(cast(float, config.init)):
            raise UsageError(f"--init must be finite, got {config.init}")
        if not cast(float, config.grad_clip) >= 0:
            raise UsageError(f"--grad-clip must be >= 0 (0: off), got {config.grad_clip}")
        if config.augment not in AUGMENTATIONS:
            raise UsageError(f"unknown augmentation {config.augment!r}",
                             hint="use none, train or reference")
        if config.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {config.schedule!r}", hint="use cosine or constant")
        if config.negation_loss not in NEGATION_LOSSES:
            raise UsageError(f"unknown negation loss {config.negation_loss!r}",
                             hint="use unlikelihood or ce")
        if config.ufm_reading not in UFM_READINGS:
            raise UsageError(f"unknown UFM reading {config.ufm_reading!r}",
                             hint="use code (learn_ufm.py as it runs) or paper")
        if not 0.0 < config.control_threshold <= 1.0:
            raise UsageError("--control-threshold must be in (0, 1], got "
                             f"{config.control_threshold}")
        if not 0.0 <= config.ufm_threshold < 1.0:
            raise UsageError(f"--ufm-threshold must be in [0, 1), got {config.ufm_threshold}")
        if cast(int, config.batch_size) < 1:
            raise UsageError(f"--batch-size must be at least 1, got {config.batch_size}")
        if config.eval_every is not None and config.eval_every < 1:
            raise UsageError(f"--eval-every must be at least 1, got {config.eval_every}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"--patience must be at least 1, got {self.patience}")
        check_precision(self.precision)
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.workers}")
