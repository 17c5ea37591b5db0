"""Merging task vectors: one module per method, a registry, a streaming engine.

Registry (``METHODS``: name -> :class:`MergeMethod` with its paper, whether it streams, its
per-tensor function and its params class):

* ``task_arithmetic`` -- Σ α_i τ_i (Ilharco et al. 2023)
* ``mean`` -- (1/N) Σ α_i τ_i (Wortsman et al. 2022)
* ``ties`` -- trim / elect sign / disjoint merge (Yadav et al. 2023)
* ``dare`` -- seeded drop and rescale, then sum or TIES (Yu et al. 2024)
* ``magnitude`` -- magnitude pruning, then sum (TIES paper's trim-only ablation)
* ``tsv`` -- TSV-M: each task's top singular components, decorrelated (Gargiulo et al. 2025)
* ``iso-c`` / ``iso-cts`` -- flattened spectra of the summed matrices, common (and
  task-specific) subspaces (Marczak et al. 2025)
* ``consensus`` -- task arithmetic (or TIES) on the entries k TALL masks agree on (Wang et al.
  2024)
* ``breadcrumbs`` -- per-row magnitude band of each vector, then sum (Davari & Belilovsky 2024)

Entry points: :func:`merge` (files, one :class:`MergeConfig`), :func:`merge_state_dicts`
(in memory), :func:`plan_sources` (streaming over any TensorSource), :func:`load_config`,
:func:`load_job` (a config with ``base:``, ``apply:``, ``sweep:``; run by
:func:`tvtool.workflows.merge_job.run_job`).
The coefficient search that evaluates merges (``merge --search-coef``) is a workflow:
:mod:`tvtool.workflows.merge_search`.
"""

from tvtool.merge.coefficients import Coefficients, load_coefficients
from tvtool.merge.config import MergeConfig, config_from_document, load_config
from tvtool.merge.engine import MergeResult, describe_plan, merge, open_merge
from tvtool.merge.job import ApplyStep, MergeJob, SweepVariant, job_from_document, load_job
from tvtool.merge.method import MergeMethod, TensorContext
from tvtool.merge.plan import MergePlan, MergeSpec, make_spec, merge_state_dicts, plan_sources
from tvtool.merge.registry import METHODS, get_method

__all__ = [
    "METHODS",
    "ApplyStep",
    "Coefficients",
    "MergeConfig",
    "MergeJob",
    "MergeMethod",
    "MergePlan",
    "MergeResult",
    "MergeSpec",
    "SweepVariant",
    "TensorContext",
    "config_from_document",
    "describe_plan",
    "get_method",
    "job_from_document",
    "load_coefficients",
    "load_config",
    "load_job",
    "make_spec",
    "merge",
    "merge_state_dicts",
    "open_merge",
    "plan_sources",
]
