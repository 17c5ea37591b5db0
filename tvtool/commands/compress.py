"""``tvtool compress``: a task vector as per-tensor low-rank factors (TSV-C).

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR
2025 (arXiv 2412.00081), TSV-C; reference ``src/utils/TSVC_utils.py::compress_tv``: every 2-D
tensor of a task vector is replaced by its top-k singular components (the reference keeps
``k = int(min(m, n) / N)`` for N tasks, ``--fraction 1/N`` here); other tensors stay dense.

Each 2-D tensor ``Δ`` is stored as ``Δ ≈ B·A`` with ``B = U_k·diag(σ_k)`` [m, k] and
``A = V_kᵀ`` [k, n], under the LoRA keys ``NAME.lora_A`` / ``NAME.lora_B`` and the metadata
``tvtool.factors=svd`` (ΔW = B·A, no alpha/r scale), so every command that reads LoRA vectors
reads the result (:func:`tvtool.formats.dense_source`). ``B·A`` is the best rank-k
approximation of Δ (Eckart–Young); the energy it keeps is ``Σ_{i≤k} σ_i² / Σ σ_i²``.

k per tensor: ``--rank K`` (min(K, min(m, n))), ``--fraction F`` (``int(F·min(m, n))``, the
reference's rule) or ``--energy E`` (the smallest k keeping E of the tensor's energy). A
tensor whose factors would hold as many numbers as the dense matrix, k·(m + n) ≥ m·n, is kept
dense (exact, and no larger).

The input is read through :func:`tvtool.vectors.open_vector`, so a LoRA vector is compressed
from its dense ΔW = (alpha/r)·B·A: an exact re-factoring when k ≥ its LoRA rank (ΔW has at
most r non-zero singular values), a truncation below. The output keeps the input's mode,
``linearized`` flag and provenance keys.

Memory: one tensor at a time. The vector is read twice: the singular values first (they
choose each k and give the figures the header records), then the factors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tvtool.commands.common import config_args
from tvtool.errors import UsageError
from tvtool.formats.lora import SUFFIX_A, SUFFIX_B
from tvtool.io import TensorInfo, check_output, write_tensors
from tvtool.limits import short_repr
from tvtool.metadata import FACTORS_KEY, SVD_FACTORS, provenance
from tvtool.threads import intra_op_threads
from tvtool.types import Logger, WriteResult
from tvtool.types import quiet as _quiet
from tvtool.vectors import accumulation_dtype, check_finite, open_vector
from tvtool.vectors.lowrank import energy_rank, singular_values, thin_svd

RULES = ("rank", "energy", "fraction")
COMPRESSION_KEY = "compression"
"""``tvtool.compression``: JSON record of how the vector was compressed and what it kept."""
_LORA_KEYS = ("lora_alpha", "lora_rank")
"""LoRA metadata that no longer describes the factors of a compressed vector."""


@dataclass(frozen=True)
class CompressConfig:
    """Configuration of ``tvtool compress`` (exactly one of ``rank``, ``energy``, ``fraction``).

    Attributes:
        vector: Task-vector file (``-`` = stdin).
        output: Output path or ``-``.
        rank: Keep the top ``rank`` singular components of every 2-D tensor.
        energy: Keep, per 2-D tensor, the fewest components holding this fraction of
            ``Σ σ²`` (in (0, 1]).
        fraction: Keep ``int(fraction · min(m, n))`` components (the reference's TSV-C rule
            with ``fraction = 1/N``).
        threads: CPU threads for the SVDs (None keeps torch's setting).

    Raises:
        UsageError: on construction, for none or several of the rules, or an invalid value.
    """

    vector: str
    output: str = "-"
    rank: int | None = None
    energy: float | None = None
    fraction: float | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        given = [name for name in RULES if getattr(self, name) is not None]
        if len(given) != 1:
            raise UsageError("give exactly one of --rank, --energy or --fraction"
                             + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
        rank = self.rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                                 or rank < 1):
            raise UsageError(f"--rank must be an integer >= 1, got {short_repr(rank)}")
        for name in ("energy", "fraction"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 < value <= 1:
                raise UsageError(f"--{name} must be a number in (0, 1], got "
                                 f"{short_repr(value)}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be positive, got {self.threads}")

    @property
    def rule(self) -> tuple[str, float]:
        """The rule given and its value, e.g. ``("energy", 0.99)``."""
        name = next(n for n in RULES if getattr(self, n) is not None)
        return name, getattr(self, name)


@dataclass
class TensorChoice:
    """What compress does with one tensor (chosen from its singular values).

    Attributes:
        name: Tensor name.
        info: Its dense layout entry.
        rank: Components kept, or None when it is stored dense.
        total: ``‖Δ‖²`` (float64).
        kept: ``‖B·A‖²``, the energy the stored tensor keeps (``total`` when dense).
    """

    name: str
    info: TensorInfo
    rank: int | None
    total: float
    kept: float

    @property
    def stored(self) -> int:
        """Numbers the output stores for this tensor."""
        if self.rank is None:
            return self.info.numel
        rows, cols = self.info.shape
        return self.rank * (rows + cols)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready record (the per-tensor rows of the report)."""
        return {"name": self.name, "shape": list(self.info.shape),
                "stored": "dense" if self.rank is None else "factors", "rank": self.rank,
                "energy": self.kept / self.total if self.total > 0 else 1.0,
                "parameters": self.stored}


def choose_rank(values: torch.Tensor, shape: tuple[int, ...], config: CompressConfig) -> int:
    """The rank one matrix keeps under the config's rule (before the dense-if-smaller check)."""
    full = min(shape)
    name, value = config.rule
    if name == "rank":
        return min(int(value), full)
    if name == "fraction":
        return int(full * value)  # the reference rounds down: int(r * sv_reduction)
    return energy_rank(values, float(value))


def plan_tensor(name: str, info: TensorInfo, tensor: torch.Tensor, config: CompressConfig
                ) -> TensorChoice:
    """Choose how one tensor is stored, from its singular values."""
    if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.numel() == 0:
        total = float(tensor.double().square().sum()) if tensor.is_floating_point() else 0.0
        return TensorChoice(name, info, None, total, total)
    values = singular_values(tensor, accumulation_dtype(tensor.dtype), name).double()
    squares = values.square()
    total = float(squares.sum())
    rank = choose_rank(values, tuple(tensor.shape), config)
    rows, cols = tensor.shape
    if rank * (rows + cols) >= rows * cols:
        return TensorChoice(name, info, None, total, total)
    return TensorChoice(name, info, rank, total, float(squares[:rank].sum()))


def output_layout(choices: list[TensorChoice]) -> list[TensorInfo]:
    """Names, dtypes and shapes of the output: dense tensors, or A [k, n] then B [m, k]."""
    layout: list[TensorInfo] = []
    for choice in choices:
        if choice.rank is None:
            layout.append(choice.info)
            continue
        rows, cols = choice.info.shape
        layout.append(TensorInfo(choice.name + SUFFIX_A, choice.info.dtype, (choice.rank, cols)))
        layout.append(TensorInfo(choice.name + SUFFIX_B, choice.info.dtype, (rows, choice.rank)))
    return layout


def factors(tensor: torch.Tensor, rank: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors ``A = V_kᵀ`` [k, n] and ``B = U_k·diag(σ_k)`` [m, k] of a truncated SVD.

    Computed in float32 (float64 for float64 tensors), returned in the tensor's dtype.
    """
    u, s, vh = thin_svd(tensor, accumulation_dtype(tensor.dtype), name)
    a = vh[:rank].contiguous()
    b = (u[:, :rank] * s[:rank]).contiguous()
    return a.to(tensor.dtype), b.to(tensor.dtype)


def summary(choices: list[TensorChoice], config: CompressConfig, input_parameters: int
            ) -> dict[str, Any]:
    """The figures the header records and ``--json`` reports (without the per-tensor rows)."""
    dense = sum(c.info.numel for c in choices)
    stored = sum(c.stored for c in choices)
    total = sum(c.total for c in choices)
    kept = sum(c.kept for c in choices)
    name, value = config.rule
    matrices = [c for c in choices if len(c.info.shape) == 2]
    return {
        "rule": name, "value": value,
        "dense_parameters": dense, "input_parameters": input_parameters,
        "parameters": stored, "size_kept": stored / dense if dense else 1.0,
        # Truncated SVD: ‖Δ − B·A‖² is the energy dropped, so both figures are exact.
        "energy_kept": kept / total if total > 0 else 1.0,
        "relative_error": math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0,
        "factored_tensors": sum(1 for c in choices if c.rank is not None),
        "dense_matrices": sum(1 for c in matrices if c.rank is None),
        "other_tensors": len(choices) - len(matrices),
        # k = 0 drops a non-zero tensor entirely (small --fraction on a small matrix).
        "zero_rank_tensors": sum(1 for c in choices if c.rank == 0 and c.total > 0),
    }


def compress(config: CompressConfig, log: Logger = _quiet) -> WriteResult:
    """Write a task vector as per-tensor low-rank factors (streaming, two reads).

    Returns:
        The result; ``details`` holds :func:`summary`'s figures and one row per tensor.

    Raises:
        UsageError: an invalid rule (checked when the config is built).
        InvalidInputError: the input is not a task vector, holds NaN/Inf, or the output is
            the input; nothing is written.
        NumericalError: an SVD did not converge (nothing is written).
    """
    check_output(config.output, [config.vector])
    vector = open_vector(config.vector)
    source = vector.source
    try:
        names = source.keys()
        stored_source = vector.stored or source
        input_parameters = sum(stored_source.info(n).numel for n in stored_source.keys())
        choices: list[TensorChoice] = []
        with intra_op_threads(config.threads):
            log(f"compress: singular values of {source.label}")
            for name in names:
                tensor = source.get(name)
                check_finite(tensor, name, source.label)
                choices.append(plan_tensor(name, source.info(name), tensor, config))
                del tensor
            figures = summary(choices, config, input_parameters)
            meta = vector.meta
            extra = {k: v for k, v in meta.extra.items() if k not in _LORA_KEYS}
            extra[FACTORS_KEY] = SVD_FACTORS
            extra[COMPRESSION_KEY] = json.dumps(figures, sort_keys=True)
            out_meta = meta.with_changes(provenance=provenance("compress", config_args(config)),
                                         extra=extra)
            layout = output_layout(choices)

            def stream() -> Iterator[tuple[str, torch.Tensor]]:
                for choice in choices:
                    tensor = source.get(choice.name)
                    if choice.rank is None:
                        yield choice.name, tensor
                        continue
                    a, b = factors(tensor, choice.rank, choice.name)
                    yield choice.name + SUFFIX_A, a
                    yield choice.name + SUFFIX_B, b

            log(f"compress: factors of {figures['factored_tensors']} tensors")
            write_tensors(config.output, stream(), out_meta.to_header(), layout=layout,
                          inputs=[config.vector])
    finally:
        source.close()
    notes = []
    if figures["zero_rank_tensors"]:
        notes.append(f"{figures['zero_rank_tensors']} non-zero tensors keep no component (k = "
                     "0): they are zero in the compressed vector")
    return WriteResult(config.output, len(layout), figures["parameters"], notes,
                       {**figures, "tensors": [c.as_json() for c in choices]})
