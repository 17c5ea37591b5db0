"""Weight disentanglement error (Ortiz-Jimenez et al., arXiv 2305.12827, eq. 4).

For two task vectors τ1, τ2 with datasets D1, D2 and a grid of coefficients,

    ξ(α1, α2) = Σ_{t=1,2} E_{x ∈ D_t} [ 1{ pred(θ0 + α1 τ1 + α2 τ2, x) ≠ pred(θ0 + α_t τ_t, x) } ]

where predictions on D_t use the zero-shot head of task t. The comparison for task t is against
the model that carries only τ_t, scaled by the same α_t, so ξ measures how much adding the
other vector changes the predictions on t: 0 means perfectly disentangled, 2 is the maximum.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tvtool.device import resolve_device
from tvtool.errors import UsageError
from tvtool.evaluate.accuracy import build_heads, predictions
from tvtool.evaluate.batches import open_eval_data
from tvtool.evaluate.linear_cache import LinearizedFeatures
from tvtool.evaluate.model import open_eval_model
from tvtool.evaluate.settings import EvalSettings, report_arguments
from tvtool.grid import parse_grid
from tvtool.metadata import provenance
from tvtool.types import Logger, ProgressFactory, no_progress
from tvtool.types import quiet as _quiet

DEFAULT_GRID = "-3:3:0.5"
"""13 values from -3 to 3 (``START:STOP:STEP``, the grid syntax of :mod:`tvtool.grid`)."""
GRID_LIMITS: dict[str, Any] = {"min_points": 2, "max_points": 101, "distinct": True}
"""What a map's grid must satisfy: ``parse_grid(text, **GRID_LIMITS)``."""


_ARGUMENT_ORDER = ("base", "vectors", "datasets", "alphas", "split", "data_root", "batch_size",
                   "device", "precision", "limit", "seed", "workers", "allow_base_mismatch",
                   "approximate_linearized", "cache_heads")
"""Key order of the report's ``settings`` (fixed by report version 1)."""


@dataclass(frozen=True)
class DisentanglementConfig:
    """Configuration of ``tvtool eval disentanglement``, validated on construction.

    Attributes:
        settings: How to evaluate (base, data, batch size, device, precision, ...).
        vectors: The two task vectors τ1, τ2.
        datasets: Their datasets D1, D2, in the same order.
        alphas: Coefficient grid, used for both axes.
        split: ``val`` or ``test``.
        approximate_linearized: Add linearized vectors to the weights.

    Raises:
        UsageError: not two vectors and two different datasets, a grid without two distinct
            values.
    """

    settings: EvalSettings
    vectors: tuple[str, str]
    datasets: tuple[str, str]
    alphas: tuple[float, ...] = field(
        default_factory=lambda: parse_grid(DEFAULT_GRID, **GRID_LIMITS))
    split: str = "test"
    approximate_linearized: bool = False

    def __post_init__(self) -> None:
        if len(self.vectors) != 2 or len(self.datasets) != 2:
            raise UsageError("disentanglement needs exactly two task vectors and two datasets",
                             hint="pass TV1 TV2 --dataset D1 --dataset D2 (same order)")
        if self.datasets[0] == self.datasets[1]:
            raise UsageError("the two datasets must differ")
        alphas = tuple(self.alphas)
        if len(alphas) < 2 or len(set(alphas)) != len(alphas):
            raise UsageError("the grid needs at least two distinct values")

    def arguments(self) -> dict[str, Any]:
        """The settings as a JSON-ready mapping."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "settings"}
        return report_arguments(self.settings, own, _ARGUMENT_ORDER)


@dataclass(frozen=True)
class DisentanglementReport:
    """The disentanglement error map.

    Attributes:
        alphas: The grid (both axes).
        error: ``error[i][j] = ξ(alphas[i], alphas[j])`` (row: α1, column: α2), in ``[0, 2]``.
        per_task: ``{dataset: [[term of that task]]}``, same layout; ``error`` is their sum.
        datasets: ``(D1, D2)``.
        model: Base, fingerprint, vectors, and whether they were evaluated linearized.
        splits: What was evaluated per dataset.
        settings: The configuration.
        notes: Remarks also printed on stderr.
        provenance: Command, versions, seed.
    """

    alphas: list[float]
    error: list[list[float]]
    per_task: dict[str, list[list[float]]]
    datasets: list[str]
    model: dict[str, Any]
    splits: list[dict[str, Any]]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The JSON document written by ``-o``."""
        return {"report": "disentanglement", "report_version": 1,
                "definition": "xi(a1,a2) = sum_t mean_{x in D_t} "
                              "1[pred(theta0+a1*tau1+a2*tau2, x) != pred(theta0+a_t*tau_t, x)]",
                "axes": {"rows": "alpha1 (vector 1)", "columns": "alpha2 (vector 2)"},
                **{k: v for k, v in dataclasses.asdict(self).items()}}


def disentanglement(config: DisentanglementConfig, *, log: Logger = _quiet,
                    progress: ProgressFactory = no_progress,
                    linear_cache: bool = True) -> DisentanglementReport:
    """Compute the weight-disentanglement error ξ over a grid of (α1, α2).

    Cost: ``G² + 2G`` model edits for a grid of ``G`` values, each evaluated on one or both
    datasets; the preprocessed images are kept in memory between edits when they fit. For
    linearized vectors the features at (α1, α2) are ``f0 + α1 j1 + α2 j2``
    (:mod:`tvtool.evaluate.linear_cache`): one primal pass and two JVPs per dataset in all,
    whatever ``G``.

    Args:
        config: What to map.
        log: Receives notes.
        progress: Progress-bar factory.
        linear_cache: Use the cached encoder outputs for linearized vectors (``False``: one
            evaluation per grid point, the reference of the tests and the benchmark).

    Raises:
        UsageError: an unknown split, a non-positive limit, a device that is not there (the
            settings themselves are checked when the configuration is built).
        InvalidInputError: bad base, vectors or data.
    """
    settings = config.settings
    alphas = tuple(config.alphas)
    device = resolve_device(settings.device)
    with open_eval_model(settings.base, config.vectors, device=device,
                         allow_base_mismatch=settings.allow_base_mismatch,
                         approximate_linearized=config.approximate_linearized) as model:
        for note in model.notes:
            log(note)
        datas = [open_eval_data(name, config.split, model.bundle.preprocess_eval,
                                data_root=settings.data_root, seed=settings.seed,
                                limit=settings.limit)
                 for name in config.datasets]
        heads = build_heads(model, datas, device=device, cache=settings.cache_heads, log=log)
        cached = LinearizedFeatures(model, batch_size=settings.batch_size,
                                    workers=settings.workers, precision=settings.precision) \
            if linear_cache and model.linearized else None
        loaded: list[tuple[float, float] | None] = [None]

        def predict(task: int, coefs: tuple[float, float]) -> Tensor:
            data = datas[task]
            if cached is not None:
                return cached.predictions(data, heads[data.name], coefs)[0]
            if loaded[0] != coefs:
                model.set_coefficients(list(coefs))
                loaded[0] = coefs
            predicted, _ = predictions(model, data, heads[data.name], settings.batch_size,
                                       workers=settings.workers, precision=settings.precision,
                                       materialize=True, progress=progress)
            return predicted

        count = len(alphas)
        with progress("disentanglement grid", count * count + 2 * count) as advance:
            # Reference predictions: only τ_t, scaled by α_t, on its own dataset.
            single: list[dict[float, Tensor]] = [{}, {}]
            for alpha in alphas:
                single[0][alpha] = predict(0, (alpha, 0.0))
                advance(1)
                single[1][alpha] = predict(1, (0.0, alpha))
                advance(1)
            terms = [torch.zeros(count, count, dtype=torch.float64) for _ in range(2)]
            for i, a1 in enumerate(alphas):
                for j, a2 in enumerate(alphas):
                    coefs = (a1, a2)
                    # On the axes the joint model is the single-task model: nothing changes.
                    joint: list[Tensor | None] = [single[0][a1] if a2 == 0 else None,
                                                  single[1][a2] if a1 == 0 else None]
                    for task in range(2):
                        known = joint[task]
                        predicted = known if known is not None else predict(task, coefs)
                        reference = single[task][coefs[task]]
                        terms[task][i, j] = torch.ne(predicted, reference).double().mean()
                    advance(1)
        error = (terms[0] + terms[1]).tolist()
        model_record = {"base": settings.base, "architecture": model.ref.architecture,
                        "base_fingerprint": model.base_fingerprint,
                        "vectors": model.describe_vectors(None),
                        "evaluated_as": "linearized" if model.linearized else "weights",
                        "device": str(device)}
        splits = [d.describe() for d in datas]
        notes = list(model.notes)
    return DisentanglementReport(
        list(alphas), error, {datas[0].name: terms[0].tolist(), datas[1].name: terms[1].tolist()},
        list(config.datasets), model_record, splits, config.arguments(), notes,
        provenance("eval disentanglement", config.arguments(), seed=settings.seed,
                   timed=False))


def render_heatmap(report: DisentanglementReport, *, title: str | None = None,
                   vmax: float | None = None) -> bytes:
    """A PNG heatmap of ξ(α1, α2) (matplotlib, Agg canvas; no global backend change).

    Args:
        report: The error map.
        title: Figure title (default names the model kind).
        vmax: Top of the colour scale (default: the map's maximum); fix it (e.g. 2) to compare
            maps side by side.

    Returns:
        The PNG bytes (write them with :func:`tvtool.io.write_bytes`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    alphas = report.alphas
    grid = torch.tensor(report.error, dtype=torch.float64).T.numpy()  # rows: α2 (y axis)
    step = (alphas[-1] - alphas[0]) / (len(alphas) - 1)
    extent = (alphas[0] - step / 2, alphas[-1] + step / 2, alphas[0] - step / 2,
              alphas[-1] + step / 2)
    figure = Figure(figsize=(5.2, 4.4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    top = vmax if vmax is not None else max(1e-9, float(grid.max()))
    image = axes.imshow(grid, origin="lower", extent=extent, cmap="viridis", vmin=0.0, vmax=top,
                        aspect="auto",
                        interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label("ξ(α₁, α₂)")
    axes.axhline(0.0, color="white", linewidth=0.6, alpha=0.6)
    axes.axvline(0.0, color="white", linewidth=0.6, alpha=0.6)
    names = report.datasets
    axes.set_xlabel(f"α₁ ({_short_name(names[0])})")
    axes.set_ylabel(f"α₂ ({_short_name(names[1])})")
    kind = "linearized model" if report.model.get("evaluated_as") == "linearized" else \
        "non-linear model"
    axes.set_title(title or f"weight disentanglement error, {kind}", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _short_name(name: str) -> str:
    return name if len(name) <= 28 else "…" + name[-27:]


def error_at(report: DisentanglementReport, alpha1: float, alpha2: float) -> float:
    """ξ at one grid point.

    Raises:
        UsageError: a coefficient not on the grid.
    """
    try:
        i, j = report.alphas.index(alpha1), report.alphas.index(alpha2)
    except ValueError:
        raise UsageError(f"({alpha1}, {alpha2}) is not on the grid {report.alphas}") from None
    return report.error[i][j]


def summarize(report: DisentanglementReport, radii: Sequence[float] = (1.0, 2.0, 3.0)
              ) -> dict[str, float]:
    """Mean ξ over the grid points with ``max(|α1|, |α2|) <= r`` for each radius ``r``."""
    out: dict[str, float] = {}
    for radius in radii:
        values = [report.error[i][j] for i, a1 in enumerate(report.alphas)
                  for j, a2 in enumerate(report.alphas) if max(abs(a1), abs(a2)) <= radius + 1e-9]
        if values:
            out[f"mean_error_within_{radius:g}"] = sum(values) / len(values)
    return out
