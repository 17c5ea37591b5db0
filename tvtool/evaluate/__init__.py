"""Evaluation: accuracy, normalized accuracy, weight disentanglement, reports and plots.

Public API:

* :class:`EvalSettings` -- the evaluation settings (base, data, batch size, device, precision,
  subset, seed, workers, head cache) every evaluating command shares; the configurations
  below and :class:`tvtool.workflows.evaluator.Evaluator` hold one.
* :func:`evaluate` (:class:`EvalConfig` -> :class:`EvalReport`) -- top-1 accuracy of a base
  plus task vectors (linearized vectors as their linearized model), per dataset, with
  normalized accuracy against fine-tuned references.
* :func:`disentanglement` (:class:`DisentanglementConfig` -> :class:`DisentanglementReport`)
  and :func:`render_heatmap` -- the weight-disentanglement error map of two vectors.
* :func:`open_eval_model` / :class:`EvalModel` -- a base with vectors, re-evaluable at any
  coefficients or explicit weights (the extension point of aTLAS and merges).
* :func:`zero_shot_head` / :func:`head_key` -- cached zero-shot heads.
"""

from tvtool.evaluate.accuracy import (
    DatasetResult,
    EvalConfig,
    EvalReport,
    ProgressFactory,
    build_heads,
    count_correct,
    evaluate,
    no_progress,
    predictions,
)
from tvtool.evaluate.batches import EvalData, open_eval_data
from tvtool.evaluate.disentanglement import (
    DEFAULT_GRID,
    GRID_LIMITS,
    DisentanglementConfig,
    DisentanglementReport,
    disentanglement,
    error_at,
    render_heatmap,
    summarize,
)
from tvtool.evaluate.head_cache import (
    HeadKey,
    clear_memory_cache,
    head_key,
    head_metadata,
    read_head_file,
    zero_shot_head,
)
from tvtool.evaluate.model import EvalModel, WeightBuilder, Weights, open_eval_model
from tvtool.evaluate.reference import ReferenceEntry, load_references, references_from_document
from tvtool.evaluate.settings import EvalSettings

__all__ = [
    "DEFAULT_GRID",
    "GRID_LIMITS",
    "DatasetResult",
    "DisentanglementConfig",
    "DisentanglementReport",
    "EvalConfig",
    "EvalData",
    "EvalModel",
    "EvalReport",
    "EvalSettings",
    "HeadKey",
    "ProgressFactory",
    "ReferenceEntry",
    "WeightBuilder",
    "Weights",
    "build_heads",
    "clear_memory_cache",
    "count_correct",
    "disentanglement",
    "error_at",
    "evaluate",
    "head_key",
    "head_metadata",
    "load_references",
    "no_progress",
    "open_eval_data",
    "open_eval_model",
    "predictions",
    "read_head_file",
    "references_from_document",
    "render_heatmap",
    "summarize",
    "zero_shot_head",
]
