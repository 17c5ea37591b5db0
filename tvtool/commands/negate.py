"""``tvtool negate``: the negated (and scaled) task vector."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from tvtool.commands.common import config_args, dumps_sorted, opened
from tvtool.errors import UsageError
from tvtool.formats.lora import SUFFIX_A
from tvtool.io import TensorSource, check_output, fingerprint, open_tensors, write_tensors
from tvtool.limits import loads_json
from tvtool.metadata import input_record, provenance
from tvtool.types import Logger, WriteResult
from tvtool.types import quiet as _quiet
from tvtool.vectors import (
    StreamPlan,
    check_coefficients,
    check_finite,
    open_vector_meta,
    plan_combine,
)


@dataclass(frozen=True)
class NegateConfig:
    """Configuration of ``tvtool negate``: write ``-coef * vector``."""

    vector: str
    output: str
    coef: float = 1.0


def negate(config: NegateConfig, log: Logger = _quiet, *,
           search: dict[str, Any] | None = None) -> WriteResult:
    """Write the negated (and scaled) task vector, streaming.

    LoRA vectors keep their factors with only B scaled by ``-coef``, so the change they
    apply is ``-coef·ΔW``. The output's provenance records the input (path, fingerprint, its
    own lineage) and, from ``negate --search``, the ``search`` that chose ``coef``.

    Raises:
        UsageError: a coefficient that is not a positive finite number.
        InvalidInputError: the input is not a task vector, or the output is the input.
    """
    check_coefficients([config.coef])
    if config.coef <= 0:
        raise UsageError(f"--coef must be positive (got {config.coef}); negate flips the sign")
    check_output(config.output, [config.vector])
    source = open_tensors(config.vector)
    with opened([source]):
        meta = open_vector_meta(source, source.label)
        plan = plan_combine(None, [(source, -config.coef)])
        if meta.factored:
            _keep_lora_a(plan, source)
        history = list(json_list(meta.extra.get("operations")))
        history.append({"op": "negate", "coef": config.coef})
        record = input_record(config.vector, meta, fingerprint(source), role="vector",
                              coef=-config.coef)
        out_meta = meta.with_changes(
            provenance=provenance("negate", config_args(config), inputs=[record],
                                  search=search),
            extra={**meta.extra, "operations": dumps_sorted(history)})
        write_tensors(config.output, plan.tensors(), out_meta.to_header(), layout=plan.layout,
                      inputs=[config.vector], check_finite=False)
    return WriteResult(config.output, len(plan.layout), plan.parameters)


def _keep_lora_a(plan: StreamPlan, source: TensorSource) -> None:
    """Scale only the B factors of a LoRA vector: (−c·B)·A = −c·ΔW.

    Scaling both factors would give (−c·B)·(−c·A) = +c²·ΔW (a negation that adds the task).
    """
    def unchanged(name: str) -> Any:
        tensor = source.get(name)
        check_finite(tensor, name, source.label)
        return tensor

    for info in plan.layout:
        if info.name.endswith(SUFFIX_A):
            plan.producers[info.name] = functools.partial(unchanged, info.name)


def json_list(text: str | None) -> list[Any]:
    """Parse a JSON list stored in metadata (empty when absent).

    Raises:
        InvalidInputError: the text is not valid JSON, or is nested too deeply.
    """
    if not text:
        return []
    value = loads_json(text, "tvtool metadata (tvtool.operations)")
    return value if isinstance(value, list) else []
