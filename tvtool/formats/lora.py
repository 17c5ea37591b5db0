"""The LoRA task-vector format: factors on disk, dense deltas on demand.

For each target ``T`` a ``lora``/``llora``/``llora-net`` file stores ``T.lora_A`` [r, in] and
``T.lora_B`` [out, r], with ``tvtool.lora_rank``, ``tvtool.lora_alpha`` and
``tvtool.lora_targets`` in the metadata (docs/format.md). ``T`` is the full model name of the
weight, or for a row block of a fused in-projection that name plus ``.q``, ``.k`` or ``.v``
(``visual.transformer.resblocks.0.attn.in_proj_weight.q``). :func:`materialize_lora` turns the
factors into dense deltas ΔW = (alpha/r)·B·A (blocks without factors are zero);
:func:`materialize_lora_source` does it lazily, one tensor at a time. The training side (the
adapters) is :mod:`tvtool.finetune.lora`.

Vectors written by ``tvtool compress`` use the same keys with ``tvtool.factors=svd`` in the
metadata, in any mode: ΔW = B·A (no alpha/r scale; B = U·diag(σ), A = Vᵀ of a truncated
SVD, so ranks may differ from tensor to tensor).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from tvtool.errors import InvalidInputError
from tvtool.io import TensorInfo, TensorSource
from tvtool.metadata import FACTORS_KEY, SVD_FACTORS, FileMeta
from tvtool.types import StateDict

SUFFIX_A = ".lora_A"
SUFFIX_B = ".lora_B"
FUSED_IN_PROJ = "in_proj_weight"
ROW_BLOCKS = ("q", "k", "v")
"""Row blocks of a fused in-projection, in the order their rows are stored."""


def split_target(target: str) -> tuple[str, int | None]:
    """The weight a LoRA target adapts, and its row block (0 q, 1 k, 2 v) or None.

    ``...attn.in_proj_weight.v`` -> (``...attn.in_proj_weight``, 2); any other name is a
    whole weight.
    """
    head, _, last = target.rpartition(".")
    if last in ROW_BLOCKS and head.rpartition(".")[2] == FUSED_IN_PROJ:
        return head, ROW_BLOCKS.index(last)
    return target, None


def assemble_deltas(per_target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Dense deltas per weight from per-target deltas (row blocks stacked, absent ones zero).

    Differentiable in the inputs (the LoRA adapters use it in their forward pass).

    Raises:
        InvalidInputError: row blocks of one weight with different shapes, or a weight given
            both whole and by row blocks.
    """
    whole: dict[str, Tensor] = {}
    blocks: dict[str, dict[int, Tensor]] = {}
    order: list[str] = []
    for target, delta in per_target.items():
        weight, block = split_target(target)
        if weight not in whole and weight not in blocks:
            order.append(weight)
        if block is None:
            whole[weight] = delta
        else:
            blocks.setdefault(weight, {})[block] = delta
    out: dict[str, Tensor] = {}
    for weight in order:
        if weight in whole and weight in blocks:
            raise InvalidInputError(f"{weight!r} has LoRA factors both for the whole matrix and "
                                    "for its q/k/v rows")
        if weight in whole:
            out[weight] = whole[weight]
            continue
        parts = blocks[weight]
        shapes = {tuple(t.shape) for t in parts.values()}
        if len(shapes) != 1:
            raise InvalidInputError(f"the q/k/v LoRA factors of {weight!r} give blocks of "
                                    f"different shapes {sorted(shapes)}")
        some = next(iter(parts.values()))
        out[weight] = torch.cat([parts[i] if i in parts else torch.zeros_like(some)
                                 for i in range(len(ROW_BLOCKS))], dim=0)
    return out


def _extra_of(metadata: FileMeta | Mapping[str, str]) -> Mapping[str, str]:
    if isinstance(metadata, FileMeta):
        return metadata.extra
    return {k.removeprefix("tvtool."): v for k, v in metadata.items()}


def svd_factored(metadata: FileMeta | Mapping[str, str]) -> bool:
    """Whether the factors are ``tvtool compress``'s (ΔW = B·A, ``tvtool.factors=svd``)."""
    return _extra_of(metadata).get(FACTORS_KEY) == SVD_FACTORS


def lora_alpha_rank(metadata: FileMeta | Mapping[str, str]) -> tuple[float, int | None]:
    """A LoRA vector's ``alpha`` and declared rank ``r`` (None when not recorded).

    Its dense delta is ``(alpha / r) · B · A`` (``tvtool.lora_alpha`` / ``tvtool.lora_rank``).

    Args:
        metadata: The vector's parsed metadata, or its raw ``tvtool.*`` header.

    Raises:
        InvalidInputError: no ``tvtool.lora_alpha``, malformed numbers, a non-finite alpha.
    """
    extra = _extra_of(metadata)
    if "lora_alpha" not in extra:
        raise InvalidInputError("LoRA vector has no tvtool.lora_alpha metadata",
                                hint="it cannot be turned into dense weights without it")
    try:
        alpha = float(extra["lora_alpha"])
        rank = int(extra["lora_rank"]) if "lora_rank" in extra else None
    except ValueError:
        raise InvalidInputError("malformed tvtool.lora_alpha / tvtool.lora_rank metadata") from None
    if not math.isfinite(alpha):
        raise InvalidInputError(f"tvtool.lora_alpha is {alpha}")
    return alpha, rank


def factor_groups(keys: Iterable[str]) -> dict[str, list[str]]:
    """Which stored keys make each dense output tensor of a LoRA vector.

    A weight adapted by factors maps to its ``.lora_A``/``.lora_B`` keys (all row blocks
    together); any other key maps to itself. Order: first appearance.
    """
    groups: dict[str, list[str]] = {}
    for key in keys:
        if key.endswith(SUFFIX_A) or key.endswith(SUFFIX_B):
            stem = key[: -len(SUFFIX_A)] if key.endswith(SUFFIX_A) else key[: -len(SUFFIX_B)]
            groups.setdefault(split_target(stem)[0], []).append(key)
        else:
            groups.setdefault(key, []).append(key)
    return groups


def materialize_lora(tensors: Mapping[str, Tensor],
                     metadata: FileMeta | Mapping[str, str]) -> StateDict:
    """Turn stored LoRA factors into dense weight deltas ΔW = (alpha/r)·B·A.

    With ``tvtool.factors=svd`` (``tvtool compress``) ΔW = B·A, without the scale.

    Keys ``T.lora_A`` / ``T.lora_B`` become one key ``T``; the q/k/v row blocks of a fused
    in-projection (``W.q``, ``W.k``, ``W.v``) become one key ``W`` whose rows without factors
    are zero. Any other tensor passes through. This is the dense task vector of ``lora``,
    ``llora`` and ``llora-net`` files: for ``llora`` it is exactly the weight change of the
    trained model, for ``llora-net`` the weight change its linearized model is evaluated at
    (see docs/finetune.md).

    Args:
        tensors: The vector's tensors.
        metadata: Its parsed :class:`~tvtool.metadata.FileMeta` or raw header (needs
            ``tvtool.lora_alpha``, unless ``tvtool.factors=svd``).

    Returns:
        Dense deltas by model state-dict name, in the factors' dtype.

    Raises:
        InvalidInputError: unpaired factors, inconsistent shapes or ranks, missing alpha, a
            weight stored both dense and as factors.
    """
    has_factors = any(k.endswith((SUFFIX_A, SUFFIX_B)) for k in tensors)
    if not has_factors:
        return dict(tensors)
    # Compressed vectors: ΔW = B·A, one rank per tensor; LoRA: (alpha/r)·B·A, one rank.
    unscaled = svd_factored(metadata)
    alpha, declared_rank = (1.0, None) if unscaled else lora_alpha_rank(metadata)
    per_target: dict[str, Tensor] = {}
    passthrough: StateDict = {}
    for key, tensor in tensors.items():
        if key.endswith(SUFFIX_B):
            if key[:-len(SUFFIX_B)] + SUFFIX_A not in tensors:
                raise InvalidInputError(f"LoRA factor {key!r} has no matching {SUFFIX_A}")
            continue
        if not key.endswith(SUFFIX_A):
            passthrough[key] = tensor
            continue
        target = key[:-len(SUFFIX_A)]
        b_key = target + SUFFIX_B
        if b_key not in tensors:
            raise InvalidInputError(f"LoRA factor {key!r} has no matching {SUFFIX_B}")
        a, b = tensor, tensors[b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidInputError(f"LoRA factors of {target!r} do not fit: A {tuple(a.shape)}, "
                                    f"B {tuple(b.shape)} (expected A [r, in], B [out, r])")
        rank = int(a.shape[0])
        if declared_rank is not None and rank != declared_rank:
            raise InvalidInputError(f"LoRA factors of {target!r} have rank {rank}, the metadata "
                                    f"says {declared_rank}")
        if rank == 0 and not unscaled:
            raise InvalidInputError(f"LoRA factors of {target!r} have rank 0 (alpha/r is "
                                    "undefined)")
        dense = b.double() @ a.double()
        if not unscaled:
            dense = dense * (alpha / rank)
        per_target[target] = dense.to(a.dtype)
    out = dict(passthrough)
    for weight, delta in assemble_deltas(per_target).items():
        if weight in tensors:
            raise InvalidInputError(f"{weight!r} is stored both dense and as LoRA factors")
        out[weight] = delta
    return out


class _DenseLoraSource:
    """A :class:`~tvtool.io.TensorSource` of ΔW = (alpha/r)·B·A per weight, built on demand."""

    def __init__(self, inner: TensorSource, meta: FileMeta) -> None:
        self._inner = inner
        self._meta = meta
        self.metadata = inner.metadata
        self.label = inner.label
        self._parts = factor_groups(inner.keys())

    def keys(self) -> list[str]:
        return list(self._parts)

    def info(self, name: str) -> TensorInfo:
        parts = self._parts[name]
        if parts == [name]:
            inner = self._inner.info(name)
            return TensorInfo(name, inner.dtype, inner.shape)
        a_key = next((p for p in parts if p.endswith(SUFFIX_A)), None)
        b_key = next((p for p in parts if p.endswith(SUFFIX_B)), None)
        if a_key is None or b_key is None:
            # Unpaired factors: reading the tensor raises the precise error.
            self.get(name)
        assert a_key is not None and b_key is not None
        a_info, b_info = self._inner.info(a_key), self._inner.info(b_key)
        rows = b_info.shape[0] if b_info.shape else 0
        if split_target(a_key[: -len(SUFFIX_A)])[1] is not None:
            rows *= len(ROW_BLOCKS)
        cols = a_info.shape[1] if len(a_info.shape) > 1 else 0
        return TensorInfo(name, a_info.dtype, (rows, cols))

    def get(self, name: str) -> torch.Tensor:
        parts = self._parts[name]
        tensors = {part: self._inner.get(part) for part in parts}
        return materialize_lora(tensors, self._meta)[name]

    def close(self) -> None:
        self._inner.close()


def materialize_lora_source(source: TensorSource, meta: FileMeta) -> TensorSource:
    """View a ``lora``/``llora`` vector as dense deltas without materialising all at once.

    Raises:
        InvalidInputError: unpaired factors or missing LoRA metadata (on first access).
    """
    return _DenseLoraSource(source, meta)
