"""LoRA task vectors seen as dense task vectors, lazily, one tensor at a time."""

from __future__ import annotations

import torch

from tvtool.finetune.lora import (
    ROW_BLOCKS,
    SUFFIX_A,
    SUFFIX_B,
    factor_groups,
    materialize_lora,
    split_target,
)
from tvtool.io import TensorInfo, TensorSource
from tvtool.metadata import FileMeta


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
