"""``tvtool merge --config`` with a job: sweep, merge, apply -- one config, one model.

:func:`run_job` runs a :class:`tvtool.merge.job.MergeJob`:

1. checks everything it can before any work: every output (confined to the config's folder
   when the config was read, see :func:`tvtool.merge.job.load_job`), the base (it resolves
   and the vectors were made from it, the rule of ``tvtool apply``);
2. with ``sweep:``, measures every variant in one evaluator
   (:func:`tvtool.workflows.merge_search.measure_merges`: α searched on the validation
   splits unless the variant fixes it) and keeps the best (average normalized validation
   accuracy, the criterion of ``merge --search-coef``; ties to the first listed);
3. writes the merged vector (``tvtool merge``), recording the sweep in its provenance;
4. with ``apply:``, writes ``base + coef · merged`` as an open_clip checkpoint and/or an
   open_clip Hugging Face directory with its model card (``tvtool apply``, reused);
5. writes the sweep's report.

A failure after the first output was written removes what this run wrote, so a failed job
leaves nothing behind. A dry run does step 1 and plans the merge(s), and says what would be
written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tvtool.commands.apply import ApplyConfig, apply
from tvtool.errors import UsageError
from tvtool.evaluate import EvalSettings
from tvtool.grid import AUTO, AutoGrid, parse_grid
from tvtool.io import check_new_directory, check_output, remove_output, write_json
from tvtool.merge.config import MergeConfig
from tvtool.merge.engine import merge, open_merge
from tvtool.merge.job import MergeJob, SweepVariant
from tvtool.types import Logger, WriteResult
from tvtool.types import quiet as _quiet
from tvtool.workflows.evaluator import Progress
from tvtool.workflows.merge_search import (
    MergeMeasurement,
    average,
    default_grid_text,
    measure_merges,
    normalize,
    vector_datasets,
)

SWEEP_REPORT_VERSION = 1


@dataclass(frozen=True)
class SweepReport:
    """What a config's ``sweep:`` measured and chose.

    Attributes:
        variants: The variants, in the config's order.
        measured: Their validation searches and test accuracies.
        chosen: Index of the variant written (best validation score; ties: the first).
        output: The merged vector written.
        limit: Examples per split evaluated (None: all).
        seed: Evaluation seed.
    """

    variants: tuple[SweepVariant, ...]
    measured: MergeMeasurement
    chosen: int
    output: str
    limit: int | None = None
    seed: int = 0

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready record per variant: its choice of α and its scores."""
        out = []
        references = self.measured.finetuned["test"]
        for index, variant in enumerate(self.variants):
            search, test = self.measured.searches[index], self.measured.tests[index]
            normalized = normalize(test, references)
            out.append({
                "variant": index, "label": variant.label(), **variant.as_json(),
                "coef_chosen_by": "fixed" if variant.coef is not None else "val search",
                "best_coef": search.best, "val_score": search.best_point.score,
                "criterion": search.criterion, "at_grid_edge": search.grid_edge is not None,
                "val": {"grid": search.as_json()["grid"]},
                "test": {"accuracy": test, "normalized_accuracy": normalized,
                         "average_accuracy": average(test.values()),
                         "average_normalized_accuracy": average(normalized.values())},
                "chosen": index == self.chosen})
        return out

    def as_json(self) -> dict[str, Any]:
        """The report (``sweep_report:``, ``--json``'s ``sweep``): kind ``merge-sweep``."""
        return {"report": "merge-sweep", "report_version": SWEEP_REPORT_VERSION,
                "output": self.output, "chosen": self.chosen,
                "datasets": list(self.measured.datasets), "split": "val",
                "criterion": self.measured.searches[self.chosen].criterion,
                "limit": self.limit, "seed": self.seed,
                "zero_shot": self.measured.zero_shot, "finetuned": self.measured.finetuned,
                "variants": self.rows()}


@dataclass
class JobResult:
    """What :func:`run_job` wrote (or, for a dry run, would write).

    Attributes:
        outputs: Every path written, in order (vector, model(s), sweep report).
        merge: The merge's result (for a dry run: its plan in ``details``).
        applied: The results of ``apply`` (checkpoint and/or directory).
        sweep: The sweep's report, if the job has one (None for a dry run).
        plan: For a dry run, what would be done (``merge-plan`` report's ``job``).
    """

    outputs: list[str]
    merge: WriteResult
    applied: list[WriteResult] = field(default_factory=list)
    sweep: SweepReport | None = None
    plan: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        """The ``merge-job`` report."""
        return {"report": "merge-job", "report_version": 1, "outputs": self.outputs,
                "merge": self.merge.as_json(), "apply": [a.as_json() for a in self.applied],
                "sweep": self.sweep.as_json() if self.sweep is not None else None}


def _grid(variant: SweepVariant) -> Sequence[float] | AutoGrid:
    if variant.coef is not None:
        return [variant.coef]
    if variant.coef_grid is not None and variant.coef_grid.strip().lower() == AUTO:
        return AutoGrid(parse_grid(default_grid_text(variant.method, variant.params)),
                        floor=0.0)
    return parse_grid(variant.coef_grid or default_grid_text(variant.method, variant.params))


def check_job(job: MergeJob, log: Logger = _quiet) -> dict[str, Any]:
    """Every check a job allows before any work; nothing is written.

    The outputs are new files (or ``--force``) and none is an input; the base resolves and
    the vectors were made from it (fingerprints; the rule of ``tvtool apply``), the sweep's
    variants plan against the vectors and the vectors' datasets are known.

    Returns:
        What the job would do: ``base``, ``apply``, ``sweep`` and ``writes`` (the dry run's
        report of it).

    Raises:
        UsageError, InvalidInputError: what the run would refuse.
    """
    from tvtool.models import base_source, fingerprint, resolve_ref
    from tvtool.vectors import check_vectors_fit_base, open_vector

    merge_cfg = job.merge
    inputs = [*merge_cfg.vectors, *([merge_cfg.coefs_file] if merge_cfg.coefs_file else [])]
    for out in job.outputs:
        if out != "-" and not (job.apply is not None and out == job.apply.hf_dir):
            check_output(out, inputs)
    if job.apply is not None and job.apply.hf_dir is not None:
        check_new_directory(job.apply.hf_dir)
    plan: dict[str, Any] = {"writes": [p for p in job.outputs if p != "-"]}
    if job.base is not None:
        ref = resolve_ref(job.base)
        source, ref = base_source(ref)
        try:
            base_fp = fingerprint(source)
        finally:
            source.close()
        metas = []
        for path in merge_cfg.vectors:
            if path == "-":
                continue
            vector = open_vector(path)
            try:
                metas.append((vector.source.label, vector.meta))
            finally:
                vector.source.close()
        for warning in check_vectors_fit_base(metas, base_fp,
                                              allow_mismatch=merge_cfg.allow_base_mismatch,
                                              architecture=ref.architecture):
            log(warning)
        plan["base"] = {"reference": job.base, "architecture": ref.architecture,
                        "fingerprint": base_fp}
    if job.apply is not None:
        plan["apply"] = {"coef": job.apply.coef, "checkpoint": job.apply.output,
                         "hf_dir": job.apply.hf_dir, "license": job.apply.license}
    if job.sweep:
        for index, variant in enumerate(job.sweep):
            try:
                open_merge(replace(job.variant_config(variant), output="-")).close()
            except UsageError as exc:
                raise UsageError(f"sweep[{index}]: {exc.message}", hint=exc.hint) from None
        names = vector_datasets(merge_cfg, job.datasets, job.suite)
        plan["sweep"] = {"datasets": names, "report": job.sweep_report,
                         "variants": [{**v.as_json(), "label": v.label(),
                                       "grid": ([v.coef] if v.coef is not None
                                                else v.coef_grid
                                                or default_grid_text(v.method, v.params))}
                                      for v in job.sweep]}
    return plan


def run_job(job: MergeJob, settings: EvalSettings | None = None, *, dry_run: bool = False,
            threads: int | None = 1, log: Logger = _quiet,
            progress: Progress = None) -> JobResult:
    """Run a merge job: sweep (if any), merge, apply (if any), report.

    Args:
        job: The job (:func:`tvtool.merge.job.load_job`).
        settings: How the sweep evaluates (its ``base`` must be the job's); needed with a
            sweep unless ``dry_run``.
        dry_run: Check and plan only; write nothing.
        threads: CPU threads of the merge kernels.
        log: Receives notes.
        progress: Progress-bar factory of the sweep's evaluations.

    Returns:
        What was written (or would be).

    Raises:
        UsageError, InvalidInputError: bad job or inputs (nothing written).
        NumericalError, TvtoolError: a failure on the way (what this run wrote is removed).
    """
    # The warnings of the checks are apply's own: shown once, by apply, in a real run.
    plan = check_job(job, log if dry_run else _quiet)
    if dry_run:
        first = job.variant_config(job.sweep[0]) if job.sweep else job.merge
        result = merge(first, log, dry_run=True, threads=threads)
        return JobResult(outputs=plan["writes"], merge=result, plan=plan)
    if job.sweep and settings is None:
        raise UsageError("a sweep needs evaluation settings")
    written: list[str] = []
    try:
        sweep = None
        config: MergeConfig = job.merge
        search: dict[str, Any] | None = None
        if job.sweep:
            assert settings is not None
            configs = [job.variant_config(v) for v in job.sweep]
            measured = measure_merges(configs, [_grid(v) for v in job.sweep], settings,
                                      datasets=job.datasets, suite=job.suite, log=log,
                                      progress=progress)
            scores = [s.best_point.score for s in measured.searches]
            chosen = max(range(len(scores)),
                         key=lambda i: -math.inf if math.isnan(scores[i]) else scores[i])
            best = measured.searches[chosen].best
            log(f"sweep: {job.sweep[chosen].label()} at α = {best:g} has the best validation "
                f"score ({scores[chosen]:.4f}); writing it")
            config = replace(configs[chosen], coefs=(best,))
            sweep = SweepReport(job.sweep, measured, chosen, config.output, settings.limit,
                                settings.seed)
            search = {"split": "val", "datasets": list(measured.datasets),
                      **measured.searches[chosen].as_json(), "limit": settings.limit,
                      "seed": settings.seed,
                      "sweep": [{"label": v.label(), **v.as_json(),
                                 "best_coef": s.best, "val_score": s.best_point.score}
                                for v, s in zip(job.sweep, measured.searches, strict=True)],
                      "chosen": chosen}
        merged = merge(config, log, threads=threads, search=search)
        written.append(merged.output)
        applied = []
        if job.apply is not None:
            assert job.base is not None
            for target in ("output", "hf_dir"):
                path = getattr(job.apply, target)
                if path is None:
                    continue
                step = ApplyConfig(
                    base=job.base, vectors=(merged.output,), coefs=(job.apply.coef,),
                    output=path if target == "output" else "",
                    allow_base_mismatch=job.merge.allow_base_mismatch,
                    approximate_linearized=job.apply.approximate_linearized,
                    hf_dir=path if target == "hf_dir" else None, license=job.apply.license
                    if target == "hf_dir" else None)
                log(f"applying the merge to {job.base} (coef {job.apply.coef:g}): {path}")
                applied.append(apply(step, log))
                written.append(path)
        if sweep is not None and job.sweep_report is not None:
            write_json(job.sweep_report, sweep.as_json(), inputs=list(job.merge.vectors))
            written.append(job.sweep_report)
        return JobResult(outputs=written, merge=merged, applied=applied, sweep=sweep)
    except BaseException:
        # A job is one result: a failure after some outputs were written removes them.
        for path in written:
            remove_output(path)
        raise
