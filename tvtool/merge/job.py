"""A merge config that produces the model: the merge, applied to a base, or a sweep of merges.

A merge config (:mod:`tvtool.merge.config`) describes one merged vector. These keys make it
a whole job, so that one ``tvtool merge --config`` writes what a release needs::

    base: tvtool-tiny               # model reference; a file path is relative to this folder
    apply:                          # base + coef x the merged vector, written as ...
      coef: 1.0                     #   default 1
      output: model.safetensors     #   ... an open_clip checkpoint, and/or
      hf_dir: clip-merged           #   ... an open_clip Hugging Face directory + model card
      license: mit                  #   the card's license (optional)
      approximate_linearized: false #   a linearized merge applied to the weights
    datasets: [MNIST, SVHN]         # sweep: each vector's dataset (default: recorded)
    suite: "8"                      # sweep: or the suite the vectors are (one per dataset)
    sweep:                          # variants of the merge, evaluated in one run
      - {method: task_arithmetic}   #   coefficient searched on the validation splits
      - {method: ties, params: {density: 0.2}}
      - {method: ties, params: {density: 0.5}, coef: 1.0}   # fixed coefficient
    sweep_report: sweep.json        # the sweep's table, as JSON

With ``sweep:``, every variant is evaluated (its coefficient searched on the validation
splits, over ``coef_grid`` or the method's grid, unless it gives ``coef``) and the variant
with the best validation score is the merge written (and applied); ties go to the first
listed. Running it is :func:`tvtool.workflows.merge_job.run_job`.

Every output the file names (``output``, ``apply.output``, ``apply.hf_dir``,
``sweep_report``) is confined to the file's folder by the one check of ``output:``
(:func:`tvtool.io.paths.confined_path`), and an existing file is replaced only with
``--force``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tvtool.errors import TvtoolError, UsageError
from tvtool.io.paths import confined_path
from tvtool.limits import check_nesting, short_repr
from tvtool.merge.config import (
    _KEYS,
    JOB_KEYS,
    MergeConfig,
    _fail,
    check_new_output,
    config_from_document,
)

APPLY_KEYS = ("coef", "output", "hf_dir", "license", "approximate_linearized")
VARIANT_KEYS = ("method", "params", "coef", "coef_grid")
MAX_VARIANTS = 64
"""Most variants one sweep evaluates (each costs a merge and a coefficient search)."""

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ApplyStep:
    """``apply:``: write ``base + coef · merged`` as a checkpoint and/or an open_clip directory.

    Attributes:
        coef: Coefficient of the merged vector.
        output: open_clip checkpoint to write (``tvtool apply -o``).
        hf_dir: open_clip Hugging Face directory to write, with a model card
            (``tvtool apply --hf-dir``).
        license: The model card's license (only with ``hf_dir``).
        approximate_linearized: Apply a linearized merge by adding it to the weights.

    Raises:
        UsageError: on construction: neither ``output`` nor ``hf_dir``, a bad coefficient,
            ``license`` without ``hf_dir``.
    """

    coef: float = 1.0
    output: str | None = None
    hf_dir: str | None = None
    license: str | None = None
    approximate_linearized: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.coef, bool) or not isinstance(self.coef, (int, float)) \
                or not math.isfinite(self.coef):
            raise UsageError(f"'apply.coef' must be a finite number, got {short_repr(self.coef)}")
        for key in ("output", "hf_dir", "license"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise UsageError(f"'apply.{key}' must be a non-empty string, got "
                                 f"{short_repr(value)}")
        if self.output is None and self.hf_dir is None:
            raise UsageError("'apply' needs 'output' (a checkpoint) or 'hf_dir' (an open_clip "
                             "directory with a model card), or both")
        if self.license is not None and self.hf_dir is None:
            raise UsageError("'apply.license' is written into the model card of 'apply.hf_dir'")
        if not isinstance(self.approximate_linearized, bool):
            raise UsageError("'apply.approximate_linearized' must be true or false")


@dataclass(frozen=True)
class SweepVariant:
    """One entry of ``sweep:``: a method and its parameters, and how its coefficient is chosen.

    Attributes:
        method: Registry name of the method.
        params: Its parameters.
        coef: A fixed coefficient; None searches it on the validation splits.
        coef_grid: The grid searched (``START:STOP:STEP``, ``a,b,c`` or ``auto``); None: the
            method's own (:func:`tvtool.workflows.merge_search.default_grid_text`).
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    coef: float | None = None
    coef_grid: str | None = None

    def label(self) -> str:
        """A short name for tables: ``ties density=0.2``."""
        params = " ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.method} {params}".strip()

    def as_json(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {"method": self.method, "params": dict(self.params), "coef": self.coef,
                "coef_grid": self.coef_grid}


@dataclass(frozen=True)
class MergeJob:
    """A merge config with what it produces besides the merged vector.

    Attributes:
        merge: The merge (with ``sweep``: the defaults of its variants).
        base: Model reference of the base the vectors were made from (needed by ``apply``
            and ``sweep``).
        apply: Write the merged model too.
        sweep: Variants evaluated in one run; the best on the validation splits is written.
        datasets: The dataset of each vector, for the sweep's evaluation.
        suite: Or the suite the vectors are (:func:`tvtool.data.match_suite`).
        sweep_report: Where the sweep's report (JSON) goes.

    Raises:
        UsageError: on construction: ``apply``/``sweep`` without ``base``, ``apply`` with the
            vector on stdout, ``datasets``/``suite``/``sweep_report`` without ``sweep``, both
            ``datasets`` and ``suite``, a variant the merge's vectors do not take (the checks
            of :class:`MergeConfig`), two outputs with one path.
    """

    merge: MergeConfig
    base: str | None = None
    apply: ApplyStep | None = None
    sweep: tuple[SweepVariant, ...] = ()
    datasets: tuple[str, ...] | None = None
    suite: str | None = None
    sweep_report: str | None = None

    def __post_init__(self) -> None:
        if self.base is not None and (not isinstance(self.base, str) or not self.base.strip()):
            raise UsageError(f"'base' must be a model reference, got {short_repr(self.base)}")
        for what, needed in (("apply", self.apply is not None), ("sweep", bool(self.sweep))):
            if needed and self.base is None:
                raise UsageError(f"'{what}' needs 'base': the model the vectors were made from")
        if self.apply is not None and self.merge.output == "-":
            raise UsageError("'apply' reads the merged vector from its file; it cannot go to "
                             "stdout", hint="set 'output' (or -o) to a file")
        if not self.sweep:
            for key in ("datasets", "suite", "sweep_report"):
                if getattr(self, key) is not None:
                    raise UsageError(f"'{key}' goes with 'sweep' (only the sweep evaluates)")
        if self.datasets is not None and self.suite is not None:
            raise UsageError("give 'datasets' or 'suite', not both")
        if len(self.sweep) > MAX_VARIANTS:
            raise UsageError(f"'sweep' lists {len(self.sweep)} variants; at most "
                             f"{MAX_VARIANTS}")
        for index, variant in enumerate(self.sweep):
            try:
                self.variant_config(variant)
            except TvtoolError as exc:
                raise UsageError(f"sweep[{index}]: {exc.message}", hint=exc.hint) from None
        outputs = [p for p in self.outputs if p != "-"]
        resolved = [str(Path(p).expanduser().absolute()) for p in outputs]
        if len(set(resolved)) != len(resolved):
            raise UsageError(f"two outputs of the config name one path: {short_repr(outputs)}")

    @property
    def is_job(self) -> bool:
        """Whether the config does more than write a merged vector."""
        return self.base is not None or self.apply is not None or bool(self.sweep)

    @property
    def outputs(self) -> list[str]:
        """Every path the job writes: the vector, the applied model(s), the sweep report."""
        out = [self.merge.output]
        if self.apply is not None:
            out += [p for p in (self.apply.output, self.apply.hf_dir) if p is not None]
        if self.sweep_report is not None:
            out.append(self.sweep_report)
        return out

    def variant_config(self, variant: SweepVariant) -> MergeConfig:
        """The merge of one sweep variant (its coefficient 1 when it is searched).

        Raises:
            UsageError: the variant's method or parameters are invalid, or its method does
                not take the per-vector parameters the vectors set.
        """
        return replace(self.merge, method=variant.method, params=dict(variant.params),
                       coefs=(variant.coef if variant.coef is not None else 1.0,))


def _resolve_base(text: Any, base_dir: Path | None) -> Any:
    """A model reference from a config: a file path in it is relative to the config's folder.

    ``NAME``, ``NAME:TAG`` and ``hf-hub:...`` stay as written; a path (``x.safetensors``,
    ``dir/x``) or the ``PATH`` of ``NAME:PATH`` is joined to the folder unless absolute.
    The rule is syntactic, like the model references' own (:func:`tvtool.models.parse_ref`).
    """
    if not isinstance(text, str) or base_dir is None or text.startswith("hf-hub:"):
        return text

    def is_path(part: str) -> bool:
        return part.endswith(_WEIGHT_SUFFIXES) or "/" in part or part.startswith("~")

    def joined(part: str) -> str:
        path = Path(part).expanduser()
        return part if path.is_absolute() or part.startswith("~") else str(base_dir / part)

    if is_path(text) and (":" not in text or Path(text).is_absolute()):
        return joined(text)
    name, colon, tag = text.partition(":")
    if colon and tag and is_path(tag):
        return f"{name}:{joined(tag)}"
    return text


def _output(value: Any, key: str, label: str, root: Path | None, base_dir: Path | None,
            force: bool, *, directory: bool = False) -> str:
    """An output the config names: confined to ``root``, new unless ``force``."""
    if not isinstance(value, str) or not value or value == "-":
        raise _fail(f"'{key}' must be a path relative to the config's folder, got "
                    f"{short_repr(value)}", label)
    if root is not None:
        path = str(confined_path(value, root, f"merge config {label}: {key}"))
    else:
        path = str(base_dir / value) if base_dir is not None \
            and not Path(value).expanduser().is_absolute() else value
    if not directory:  # an open_clip directory is always new: apply refuses a non-empty one
        check_new_output(path, key, label, force)
    return path


def _variant(item: Any, index: int, merge: MergeConfig, label: str) -> SweepVariant:
    from tvtool.grid import AUTO, parse_grid

    if not isinstance(item, Mapping):
        raise _fail(f"sweep[{index}] must be a mapping ({{method, params, coef, coef_grid}}), "
                    f"got {short_repr(item)}", label)
    unknown = sorted(short_repr(k, 40) for k in item if k not in VARIANT_KEYS)
    if unknown:
        raise _fail(f"sweep[{index}]: unknown key(s) {short_repr(unknown)}; known keys are "
                    f"{list(VARIANT_KEYS)}", label)
    method = item.get("method", merge.method)
    # A variant of the same method starts from the merge's parameters; another method from
    # its own defaults (the merge's parameters would not fit it).
    params = item.get("params", dict(merge.params) if method == merge.method else {})
    if not isinstance(params, Mapping):
        raise _fail(f"sweep[{index}].params must be a mapping, got {short_repr(params)}", label)
    coef = item.get("coef")
    if coef is not None and (isinstance(coef, bool) or not isinstance(coef, (int, float))
                             or not math.isfinite(coef)):
        raise _fail(f"sweep[{index}].coef must be a finite number, got {short_repr(coef)}",
                    label)
    grid = item.get("coef_grid")
    if grid is not None:
        if coef is not None:
            raise _fail(f"sweep[{index}] gives both 'coef' (fixed) and 'coef_grid' (searched)",
                        label)
        if not isinstance(grid, str):
            raise _fail(f"sweep[{index}].coef_grid must be a string such as '0:1:0.1', got "
                        f"{short_repr(grid)}", label)
        if grid.strip().lower() != AUTO:
            try:
                parse_grid(grid)
            except TvtoolError as exc:
                raise _fail(f"sweep[{index}].coef_grid: {exc.message}", label, exc.hint) \
                    from None
    return SweepVariant(method=method if isinstance(method, str) else short_repr(method),
                        params=dict(params), coef=float(coef) if coef is not None else None,
                        coef_grid=grid)


def job_from_document(document: Any, *, label: str = "", base_dir: Path | None = None,
                      output: str | None = None, output_root: Path | None = None,
                      force: bool = False) -> MergeJob:
    """Validate a config document, merge and job keys alike, and build the :class:`MergeJob`.

    Args:
        document: Parsed YAML/JSON.
        label: How to name the document in errors.
        base_dir: Directory relative paths are resolved against (the config file's).
        output: The merged vector's path, overriding ``output`` (``-o``).
        output_root: When given, every output the document names must stay inside this
            folder (:func:`tvtool.io.paths.confined_path`).
        force: Let an output the document names replace an existing file.

    Raises:
        InvalidInputError: what :func:`tvtool.merge.config.config_from_document` refuses;
            unknown job keys, wrong types, an output outside ``output_root`` or (without
            ``force``) existing, an invalid sweep variant or combination.
    """
    label = label or "<document>"
    check_nesting(document, f"merge config {label}")
    if not isinstance(document, Mapping):
        raise _fail(f"must be a mapping, got {type(document).__name__}", label)
    known = (*_KEYS, *JOB_KEYS)
    unknown = sorted(short_repr(k, 40) for k in document if k not in known)
    if unknown:
        raise _fail(f"unknown key(s) {short_repr(unknown)}; known keys are {list(known)}",
                    label)
    merge = config_from_document({k: v for k, v in document.items() if k in _KEYS},
                                 label=label, base_dir=base_dir, output=output,
                                 output_root=output_root)
    if output is None and merge.output != "-":
        check_new_output(merge.output, "output", label, force)
    sweep_items = document.get("sweep")
    if sweep_items is not None and (not isinstance(sweep_items, list) or not sweep_items):
        raise _fail("'sweep' must be a non-empty list of variants", label)
    if sweep_items and ("coef" in document or document.get("coefs_file") is not None
                        or any(isinstance(v, Mapping) and "coef" in v
                               for v in document.get("vectors") or [])):
        raise _fail("with 'sweep', each variant's coefficient is searched on the validation "
                    "splits, or given by the variant's own 'coef'; drop the merge's 'coef'",
                    label)
    apply = document.get("apply")
    step = None
    if apply is not None:
        if not isinstance(apply, Mapping):
            raise _fail(f"'apply' must be a mapping ({{coef, output, hf_dir, license}}), got "
                        f"{short_repr(apply)}", label)
        unknown = sorted(short_repr(k, 40) for k in apply if k not in APPLY_KEYS)
        if unknown:
            raise _fail(f"apply: unknown key(s) {short_repr(unknown)}; known keys are "
                        f"{list(APPLY_KEYS)}", label)
        values = dict(apply)
        for key, directory in (("output", False), ("hf_dir", True)):
            if values.get(key) is not None:
                values[key] = _output(values[key], f"apply.{key}", label, output_root,
                                      base_dir, force, directory=directory)
        try:
            step = ApplyStep(**values)
        except TvtoolError as exc:
            raise _fail(exc.message, label, exc.hint) from None
    report = document.get("sweep_report")
    if report is not None:
        report = _output(report, "sweep_report", label, output_root, base_dir, force)
    datasets = document.get("datasets")
    if datasets is not None and (not isinstance(datasets, list) or not datasets
                                 or not all(isinstance(d, str) and d for d in datasets)):
        raise _fail("'datasets' must be a non-empty list of dataset names", label)
    if datasets is not None and len(datasets) != len(merge.vectors):
        raise _fail(f"'datasets' names {len(datasets)} datasets for {len(merge.vectors)} "
                    "vectors", label, "give one dataset per vector, in order")
    suite = document.get("suite")
    if suite is not None:
        if isinstance(suite, bool) or not isinstance(suite, (int, str)):
            raise _fail(f"'suite' must be 8, 14 or 20, got {short_repr(suite)}", label)
        from tvtool.data.suites import SUITES

        suite = str(suite)
        if suite not in SUITES:
            raise _fail(f"unknown suite {short_repr(suite)}", label,
                        f"use one of {', '.join(SUITES)}")
    variants = tuple(_variant(item, index, merge, label)
                     for index, item in enumerate(sweep_items or []))
    try:
        return MergeJob(merge=merge, base=_resolve_base(document.get("base"), base_dir),
                        apply=step, sweep=variants,
                        datasets=tuple(datasets) if datasets is not None else None,
                        suite=suite, sweep_report=report)
    except TvtoolError as exc:
        raise _fail(exc.message, label, exc.hint) from None


def load_job(path: str, *, output: str | None = None, force: bool = False) -> MergeJob:
    """Read and validate a merge config file, job keys included (``tvtool merge --config``).

    The outputs the file names are confined as :func:`tvtool.merge.config.load_config`
    confines ``output``: relative to the file's folder (the working directory for stdin),
    never absolute, never leading out of it (``..``, symlinks), never an existing file unless
    ``force``; none may be the config file itself.

    Args:
        path: Config file (``-`` = stdin).
        output: The merged vector's path, overriding the file's ``output`` (``-o``).
        force: Let the outputs the file names replace existing files (``--force``).

    Raises:
        InvalidInputError: unreadable file, invalid YAML, a schema violation, an output
            outside the folder, existing (without ``force``) or equal to the config file.
        UsageError: ``force`` with ``output`` and no other output for it to apply to.
    """
    from tvtool.io import check_distinct_paths
    from tvtool.io.yaml_io import read_yaml

    document = read_yaml(path)
    base_dir = None if path == "-" else Path(path).expanduser().parent
    job = job_from_document(document, label=repr(path), base_dir=base_dir, output=output,
                            output_root=base_dir if base_dir is not None else Path.cwd(),
                            force=force)
    if force and output is not None and len(job.outputs) == 1:
        raise UsageError("--force applies to the outputs a config names; -o already says "
                         "where to write (and replaces an existing file)",
                         hint="drop --force, or drop -o")
    for out in job.outputs:
        check_distinct_paths(out, [path])
    return job


__all__ = ["APPLY_KEYS", "JOB_KEYS", "ApplyStep", "MergeJob", "SweepVariant",
           "job_from_document", "load_job"]
