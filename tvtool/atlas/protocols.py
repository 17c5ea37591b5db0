"""Learning protocols: how an objective is trained and its coefficients selected.

An objective (:mod:`tvtool.atlas.objectives`) says what is minimised; a protocol says how:
which examples make a step's batch, how the datasets' losses combine, the optimiser's
schedule, clamping and gradient clipping, how long to train and which candidate is kept.
Three protocols exist:

* ``adamerging`` -- AdaMerging's ``main_layer_wise_adamerging.py`` (EnnengYang/AdaMerging):
  every step draws, for every dataset, a fresh shuffle of its unlabelled examples and takes two
  batches of 16 from it (the reference's loop breaks after its second batch), the mean
  entropies of all those batches summed; the coefficients are a raw parameter clamped to
  [0, 1] in the forward pass; Adam (lr 1e-3, no weight decay, no schedule, no clipping), 500
  steps from 0.3; the last iterate is kept (no selection).
* ``atlas`` -- fredzzhang/atlas' ``learn_few_shots.py`` (``ce``), ``learn_ufm.py`` (``ufm``)
  and ``learn_task_negation.py`` (``negation``): batches of 128 split across the datasets
  (64 target + 64 control for negation), losses summed, epochs over the training examples
  (few-shot examples oversampled to at least 10 batches an epoch), AdamW with weight decay 0.1,
  a cosine schedule without warm-up (constant for negation), gradient clipping at 1 applied to
  the fp16 loss-scaled gradient, evaluation after every epoch on the labelled ``val`` split and
  the best epoch kept (starting from the zero-shot model).
* ``tvtool`` -- tvtool's own: a held-out part of the training examples selects the candidate
  (label-free for the unlabelled objectives), batches of 32 split across the datasets, losses
  averaged, AdamW with a cosine schedule.

Each objective's default protocol is its reference's: ``entropy`` -> ``adamerging``; ``ce``,
``ufm``, ``negation`` -> ``atlas``; ``infomax`` (SHOT, whose own protocol tvtool does not
implement) -> ``tvtool``. See docs/coeffs.md, "Protocols".
"""

from __future__ import annotations

from dataclasses import dataclass

from tvtool.errors import UsageError

PROTOCOLS = ("adamerging", "atlas", "tvtool")
UFM_READINGS = ("code", "paper")
SCHEDULES = ("cosine", "constant")

DEFAULT_PROTOCOL: dict[str, str] = {
    "ce": "atlas", "ufm": "atlas", "negation": "atlas",
    "entropy": "adamerging", "infomax": "tvtool",
}

# The fp16 GradScaler's initial loss scale (torch.cuda.amp.GradScaler(init_scale=2**16)); it
# grows only after 2000 steps without an overflow, longer than the reference runs.
AMP_LOSS_SCALE = 2.0 ** 16


@dataclass(frozen=True)
class Protocol:
    """The fixed mechanics of a protocol (see the module docstring).

    Attributes:
        name: ``adamerging``, ``atlas`` or ``tvtool``.
        objectives: The objectives it runs.
        batching: ``stream`` (shuffled epochs of each dataset, tvtool), ``fresh`` (a new
            shuffle of every dataset each step, AdaMerging) or ``epochs`` (epochs over index
            lists, aTLAS).
        reduce: How the datasets' losses combine: ``mean`` or ``sum``.
        per_task_batch: Whether ``batch_size`` is each dataset's batch (AdaMerging) rather
            than the step's, split across the datasets.
        micro_batches: Batches of ``batch_size`` drawn per dataset and step, each one's mean
            loss summed (AdaMerging: 2).
        clamp: Bounds of the coefficients, applied in the forward pass to a raw parameter
            (AdaMerging's ``torch.clamp(lambdas_raw, 0, 1)``), or None.
        grad_scale: The loss scale the gradient carries when it is clipped (aTLAS clips the
            fp16 GradScaler's scaled gradient, :data:`AMP_LOSS_SCALE`; 1 elsewhere).
        selection: ``held-out`` (tvtool's rule on a held-out part), ``val-split`` (accuracy
            on the labelled ``val`` split after every epoch, aTLAS) or ``last`` (AdaMerging).
        held_out_fraction: Default share of the training examples held out (``tvtool``).
        summary: One line for messages and docs.
    """

    name: str
    objectives: tuple[str, ...]
    batching: str
    reduce: str
    per_task_batch: bool
    micro_batches: int
    clamp: tuple[float, float] | None
    grad_scale: float
    selection: str
    held_out_fraction: float
    summary: str


PROTOCOL_SPECS: dict[str, Protocol] = {
    "adamerging": Protocol(
        "adamerging", ("entropy", "infomax"), "fresh", "sum", True, 2, (0.0, 1.0), 1.0,
        "last", 0.0, "AdaMerging main_layer_wise_adamerging.py: per-dataset batches 2 x 16 "
        "summed, coefficients clamped to [0, 1], Adam, last iterate"),
    "atlas": Protocol(
        "atlas", ("ce", "ufm", "negation"), "epochs", "sum", False, 1, None, AMP_LOSS_SCALE,
        "val-split", 0.0, "aTLAS learn_few_shots.py / learn_ufm.py / learn_task_negation.py: "
        "epochs of batch 128, selection on the labelled val split after every epoch"),
    "tvtool": Protocol(
        "tvtool", ("ce", "entropy", "infomax", "ufm", "negation"), "stream", "mean", False, 1,
        None, 1.0, "held-out", 0.2, "tvtool: a held-out part selects the candidate "
        "(label-free for unlabelled objectives)"),
}


@dataclass(frozen=True)
class ObjectiveDefaults:
    """Hyper-parameters a protocol uses for an objective unless told otherwise.

    Attributes:
        steps: Optimisation steps (None: ``epochs`` over the training examples).
        epochs: Epochs (``atlas``; None elsewhere).
        lr: Learning rate.
        weight_decay: AdamW weight decay.
        init: Initial value of every coefficient.
        grad_clip: Maximum gradient norm (None: no clipping).
        augment: ``none``, ``train`` or ``reference`` (see :mod:`tvtool.atlas.augment`).
        batch_size: Examples per step (AdaMerging: per dataset and batch).
        schedule: ``cosine`` or ``constant`` learning rate.
        eval_every: Steps between evaluations (None: every epoch for ``atlas``, the last step
            only for ``adamerging``).
        negation_loss: ``unlikelihood`` or ``ce`` (the aTLAS reference's ``−CE``).
        ufm_reading: ``code`` (every example trusted, as learn_ufm.py runs) or ``paper`` (a
            class-balanced trusted subset, the rest thresholded).
        source: Where the values come from.
    """

    steps: int | None
    epochs: int | None
    lr: float
    weight_decay: float
    init: float
    grad_clip: float | None
    augment: str
    batch_size: int
    schedule: str
    eval_every: int | None
    negation_loss: str
    ufm_reading: str
    source: str


def _tvtool(steps: int, lr: float, wd: float, init: float, clip: float | None, augment: str,
            source: str) -> ObjectiveDefaults:
    return ObjectiveDefaults(steps, None, lr, wd, init, clip, augment, 32, "cosine", 10,
                             "unlikelihood", "paper", source)


def _atlas(epochs: int, lr: float, schedule: str, augment: str, source: str
           ) -> ObjectiveDefaults:
    return ObjectiveDefaults(None, epochs, lr, 0.1, 0.0, 1.0, augment, 128, schedule, None,
                             "ce", "code", source)


_ADAMERGING = ObjectiveDefaults(500, None, 1e-3, 0.0, 0.3, None, "none", 16, "constant", None,
                                "unlikelihood", "paper",
                                "AdaMerging (prior 0.3, Adam lr 1e-3, 500 steps, 2 x 16 images "
                                "per dataset and step, clamp [0, 1], last iterate)")

DEFAULTS: dict[tuple[str, str], ObjectiveDefaults] = {
    ("tvtool", "ce"): _tvtool(100, 0.1, 0.1, 0.0, 1.0, "reference",
                              "aTLAS learn_few_shots.py's lr, wd, clip and crop+flip"),
    ("tvtool", "ufm"): _tvtool(500, 1e-3, 0.1, 0.0, 1.0, "reference",
                               "aTLAS learn_ufm.py's lr, wd, clip and crop+flip"),
    ("tvtool", "entropy"): _tvtool(500, 1e-3, 0.0, 0.3, None, "none",
                                   "AdaMerging's prior 0.3, lr 1e-3, 500 steps"),
    ("tvtool", "infomax"): _tvtool(500, 1e-3, 0.0, 0.3, None, "none",
                                   "as entropy (AdaMerging's settings)"),
    ("tvtool", "negation"): _tvtool(100, 5e-3, 0.1, 0.0, 1.0, "train",
                                    "aTLAS learn_task_negation.py's lr (1e-3 x 5), wd, clip, "
                                    "open_clip training transform"),
    ("adamerging", "entropy"): _ADAMERGING,
    ("adamerging", "infomax"): _ADAMERGING,
    ("atlas", "ce"): _atlas(10, 0.1, "cosine", "reference",
                            "aTLAS learn_few_shots.py (10 epochs, lr 0.1, batch 128, cosine)"),
    ("atlas", "ufm"): _atlas(10, 1e-3, "cosine", "reference",
                             "aTLAS learn_ufm.py (10 epochs, lr 1e-3, batch 128, cosine)"),
    ("atlas", "negation"): _atlas(10, 5e-3, "constant", "train",
                                  "aTLAS learn_task_negation.py (lr 1e-3 x 5, batch 64 + 64, "
                                  "constant; the reference tunes 2-20 epochs and x2-x10 per "
                                  "dataset)"),
}


def resolve_protocol(objective: str, protocol: str | None) -> str:
    """The protocol an objective runs under (its default when ``protocol`` is None).

    Raises:
        UsageError: an unknown protocol, or one that does not run this objective.
    """
    name = DEFAULT_PROTOCOL.get(objective, "tvtool") if protocol is None else protocol
    if name not in PROTOCOL_SPECS:
        raise UsageError(f"unknown protocol {name!r}", hint="use adamerging, atlas or tvtool")
    spec = PROTOCOL_SPECS[name]
    if objective not in spec.objectives:
        raise UsageError(f"the {name} protocol does not run the {objective} objective",
                         hint=f"{name} runs {', '.join(spec.objectives)}; tvtool runs every "
                              "objective")
    return name


def defaults_for(objective: str, protocol: str | None) -> ObjectiveDefaults:
    """The defaults of ``objective`` under ``protocol`` (its default protocol when None).

    Raises:
        UsageError: see :func:`resolve_protocol`.
    """
    return DEFAULTS[(resolve_protocol(objective, protocol), objective)]


def oversampled(count: int, batch: int) -> int:
    """How many copies of ``count`` few-shot examples make an epoch (``learn_few_shots.py``).

    ``r = count / batch``; below 10 batches the examples are repeated ``int(10 / r) + 1``
    times, otherwise once.
    """
    ratio = count / batch
    return int(10 / ratio) + 1 if ratio < 10 else 1
