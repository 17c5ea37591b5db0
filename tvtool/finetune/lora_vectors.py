"""LoRA task vectors seen as dense task vectors, lazily, one tensor at a time."""

from __future__ import annotations

import torch

from tvtool.finetune.lora import SUFFIX_A, SUFFIX_B, materialize_lora
from tvtool.io import TensorInfo, TensorSource
from tvtool.metadata import FileMeta


class _DenseLoraSource:
    """A :class:`~tvtool.io.TensorSource` of ΔW = (alpha/r)·B·A per target, built on demand."""

    def __init__(self, inner: TensorSource, meta: FileMeta) -> None:
        self._inner = inner
        self._meta = meta
        self.metadata = inner.metadata
        self.label = inner.label
        self._parts: dict[str, tuple[str, ...]] = {}
        for key in inner.keys():
            if key.endswith(SUFFIX_A):
                target = key[: -len(SUFFIX_A)]
                self._parts[target] = (target + SUFFIX_A, target + SUFFIX_B)
            elif not key.endswith(SUFFIX_B):
                self._parts[key] = (key,)

    def keys(self) -> list[str]:
        return list(self._parts)

    def info(self, name: str) -> TensorInfo:
        parts = self._parts[name]
        if len(parts) == 1:
            inner = self._inner.info(name)
            return TensorInfo(name, inner.dtype, inner.shape)
        a_info, b_info = self._inner.info(parts[0]), self._inner.info(parts[1])
        return TensorInfo(name, a_info.dtype, (b_info.shape[0], a_info.shape[1]))

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
