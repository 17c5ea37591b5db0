"""Task-vector formats: how a vector's file becomes dense weight deltas.

What a mode makes of its file is declared on :class:`tvtool.metadata.Mode` (``linearized``,
``factored``); a vector of any mode compressed by ``tvtool compress`` stores factors too
(``FileMeta.factored``). This package holds the one expansion every command uses: merge,
apply, inspect, eval and learn-coeffs call :func:`dense_source` and never name a mode.

* :mod:`tvtool.formats.lora` -- the LoRA factor format (``lora``, ``llora``, ``llora-net``,
  and compressed vectors, ``tvtool.factors=svd``).
"""

from __future__ import annotations

from tvtool.formats.lora import materialize_lora, materialize_lora_source
from tvtool.io import TensorSource
from tvtool.metadata import FileMeta


def dense_source(source: TensorSource, meta: FileMeta) -> TensorSource:
    """The vector as dense deltas, tensor by tensor, whatever its mode stores.

    A factored (LoRA) vector becomes ΔW = (alpha/r)·B·A per adapted weight, computed when a
    tensor is read (ΔW = B·A for a vector compressed by ``tvtool compress``, in any mode);
    any other vector is returned as it is. For ``llora`` the deltas are exactly the weight
    change of the trained model; for ``llora-net`` they are the weight change its linearized
    model is evaluated at.

    Raises:
        InvalidInputError: unpaired factors or missing LoRA metadata (when a tensor is read).
    """
    if meta.factored:
        return materialize_lora_source(source, meta)
    return source


__all__ = ["dense_source", "materialize_lora", "materialize_lora_source"]
