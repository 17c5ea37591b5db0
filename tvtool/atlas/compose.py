"""The composed model θ0 + Σ_t Σ_b λ_{t,b} τ_{t,b}, built with a few large fused operations.

The T task vectors are packed once into one ``[T, num_chunks, chunk]`` tensor (see
:class:`~tvtool.atlas.blocks.Packing`; bf16 allowed). Each chunk lies in one block, so the
composed offset of every element is one batched matrix product over chunks,
``Σ_t λ[t, block(c)] · V[t, c, :]`` — no Python loop over tensors × vectors, no ``[T, P]``
temporary, and autograd's backward of that product is the segment reduction
``∂L/∂λ[t, b] = Σ_{e ∈ b} g_e · V[t, e]`` for free. The packed result is split back into views
of the parameter shapes and the encoder is run with :func:`torch.func.functional_call`, or, for
linearized vectors, as ``f(x; θ0) + J·(Σ λτ)`` with :func:`tvtool.linearize.linearized_forward`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tvtool.atlas.blocks import Packing, Partition
from tvtool.errors import InvalidInputError
from tvtool.limits import short_list
from tvtool.types import StateDict

VISUAL_PREFIX = "visual."


class VectorStack:
    """T task vectors packed into one ``[T, num_chunks, chunk]`` tensor.

    Memory is the vectors' storage in ``dtype`` (plus the chunk padding: a few % on large models).

    Args:
        packing: The layout.
        vectors: One mapping (or lazily read source with ``get``) per vector; tensors a vector
            lacks count as zero.
        dtype: Storage dtype (float32, bfloat16, float16).
        device: Where the stack lives.
    """

    def __init__(self, packing: Packing, vectors: Sequence[Mapping[str, Tensor]],
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if not vectors:
            raise InvalidInputError("at least one task vector is needed")
        self.packing = packing
        self.data = torch.empty(len(vectors), packing.num_chunks, packing.chunk, dtype=dtype,
                                device=device)
        # One vector at a time through a CPU row: peak memory is the stack plus one vector.
        row = torch.empty(packing.padded_numel, dtype=dtype)
        for index, vector in enumerate(vectors):
            packing.pack(vector, dtype, out=row)
            self.data[index].view(-1).copy_(row)
        packing.to(device)
        self.chunk_block = packing.chunk_block

    @property
    def num_vectors(self) -> int:
        """T, the number of stacked vectors."""
        return int(self.data.shape[0])

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Σ_t λ[t, block(e)] · τ_t[e]`` for every packed element, differentiable in λ.

        Args:
            coefficients: ``[T, num_blocks]`` float tensor on the stack's device.

        Returns:
            The packed offset, float32, ``[padded_numel]``.
        """
        per_chunk = coefficients.index_select(1, self.chunk_block)  # [T, N]
        # [N, 1, T] @ [N, T, C]: one batched GEMV; its backward is the per-chunk dot product
        # V[:, c, :] · g[c, :], i.e. the segment sum the coefficients need.
        out = torch.bmm(per_chunk.t().unsqueeze(1).to(self.data.dtype),
                        self.data.transpose(0, 1))
        return out.reshape(-1).float()


class ComposedEncoder:
    """An image encoder whose weights are ``θ0 + Σ λτ`` (or its linearization at θ0).

    Args:
        encoder: The image encoder (e.g. ``clip.visual``); its parameters are frozen and
            serve as θ0.
        stack: The packed task vectors (full names, e.g. ``visual.conv1.weight``).
        prefix: Prefix of the encoder's parameters in the full names.
        linearized: Evaluate ``f(x; θ0) + J_θ f(x; θ0)·Σ λτ`` instead of ``f(x; θ0 + Σ λτ)``.

    Raises:
        InvalidInputError: a covered tensor that is not a parameter of the encoder, or has
            another shape.
    """

    def __init__(self, encoder: nn.Module, stack: VectorStack, *,
                 prefix: str = VISUAL_PREFIX, linearized: bool = False) -> None:
        self.encoder = encoder
        self.stack = stack
        self.prefix = prefix
        self.linearized = linearized
        for parameter in encoder.parameters():
            parameter.requires_grad_(False)
        params = dict(encoder.named_parameters())
        partition = stack.packing.partition
        for spec in partition.tensors:
            local = spec.name[len(prefix):] if spec.name.startswith(prefix) else None
            if local is None or local not in params:
                raise InvalidInputError(f"tensor {spec.name!r} is not a parameter of the image "
                                        "encoder", hint="aTLAS learns coefficients for the "
                                        "image encoder's tensors only")
            if tuple(params[local].shape) != spec.shape:
                raise InvalidInputError(f"tensor {spec.name!r} has shape {spec.shape}, the "
                                        f"encoder's is {tuple(params[local].shape)}")
        self.theta0: Tensor | None = None
        if not linearized:
            device = stack.data.device
            self.theta0 = stack.packing.pack(
                {prefix + n: p.detach().float().cpu() for n, p in params.items()},
                torch.float32).to(device)

    @property
    def partition(self) -> Partition:
        """The coefficient blocks."""
        return self.stack.packing.partition

    def weights(self, coefficients: Tensor) -> dict[str, Tensor]:
        """The encoder's composed weights (or, linearized, the offsets Σ λτ) by local name.

        Computed in float32 outside autocast, so bf16 autocast never re-casts the stack.
        """
        device_type = self.stack.data.device.type
        with torch.autocast(device_type, enabled=False):
            packed = self.stack.combine(coefficients)
            if self.theta0 is not None:
                packed = self.theta0 + packed
            views = self.stack.packing.unpack(packed)
        start = len(self.prefix)
        return {name[start:]: view for name, view in views.items()}

    def features(self, images: Tensor, weights: Mapping[str, Tensor]) -> Tensor:
        """Run the encoder with composed ``weights`` (from :meth:`weights`)."""
        if self.linearized:
            from tvtool.linearize import linearized_forward

            return linearized_forward(self.encoder, None, weights, images)
        return functional_call(self.encoder, dict(weights), (images,))

    def __call__(self, coefficients: Tensor, images: Tensor) -> Tensor:
        return self.features(images, self.weights(coefficients))


# ---------------------------------------------------------------------------------------------
# Pure functions over state dicts (files, merges, tests)
# ---------------------------------------------------------------------------------------------


def compose_tensor(partition: Partition, coefficients: Tensor, name: str,
                   parts: Sequence[Tensor | None]) -> Tensor:
    """``Σ_t λ_t ⊙ τ_t`` for one tensor, accumulated in float32.

    Args:
        partition: The blocks.
        coefficients: ``[T, num_blocks]``.
        name: A tensor of the partition.
        parts: The tensor of each vector (None where a vector lacks it), T entries.

    Returns:
        The float32 offset in the tensor's shape.
    """
    spec = partition.tensors[partition.index[name]]
    coefs = partition.tensor_coefficients(coefficients.float(), name)
    acc = torch.zeros(spec.shape, dtype=torch.float32)
    for row, part in enumerate(parts):
        if part is not None:
            acc.addcmul_(coefs[row], part.float())
    return acc


def composed_vector(vectors: Sequence[Mapping[str, Tensor]], coefficients: Tensor,
                    partition: Partition) -> StateDict:
    """The composed task vector ``Σ_t Σ_b λ_{t,b} τ_{t,b}`` over the partition's tensors.

    Raises:
        InvalidInputError: the coefficient matrix does not fit the vectors or the partition.
    """
    _check_matrix(coefficients, len(vectors), partition)
    return {spec.name: compose_tensor(partition, coefficients, spec.name,
                                      [v.get(spec.name) for v in vectors])
            for spec in partition.tensors}


def compose_state(base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]],
                  coefficients: Tensor, partition: Partition) -> StateDict:
    """``θ0 + Σ_t Σ_b λ_{t,b} τ_{t,b}`` for every tensor of ``base``.

    Tensors outside the partition keep their base value; results keep the base dtype.

    Raises:
        InvalidInputError: matrix shape mismatch, or a partition tensor missing from the base.
    """
    missing = [spec.name for spec in partition.tensors if spec.name not in base]
    if missing:
        raise InvalidInputError(f"{len(missing)} coefficient tensors are not in the base, e.g. "
                                f"{short_list(missing, 3)}")
    offsets = composed_vector(vectors, coefficients, partition)
    return {name: ((tensor.float() + offsets[name]).to(tensor.dtype) if name in offsets
                   else tensor) for name, tensor in base.items()}


def _check_matrix(coefficients: Tensor, count: int, partition: Partition) -> None:
    expected = (count, partition.num_blocks)
    if coefficients.ndim != 2 or tuple(coefficients.shape) != expected:
        raise InvalidInputError(f"coefficient matrix has shape {tuple(coefficients.shape)}, "
                                f"expected {expected} ({count} vectors x "
                                f"{partition.num_blocks} blocks)")
