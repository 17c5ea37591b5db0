"""Parameter blocks of aTLAS: which coefficient scales which element of a task vector.

aTLAS (Zhang et al., arXiv 2407.02880) learns one coefficient per task vector per parameter
block. A :class:`Partition` assigns every element of a set of tensors to exactly one block:

* ``task`` -- one block holding everything (one coefficient per vector: task arithmetic with a
  learned α per vector);
* ``tensor`` -- one block per parameter tensor (the paper's default);
* ``layer`` -- one block per residual block (``…resblocks.N``); tensors outside residual
  blocks are grouped by their parent module (``visual.ln_pre``, ``visual.conv1``), and tensors
  that sit directly on the encoder (``visual.proj``, ``visual.class_embedding``) are their own
  block;
* ``random:K`` -- tvtool's variant of the paper's aTLAS×K: every tensor (biases and norms
  included) split at random into K groups of equal size (±1 element). The split of a tensor
  depends only on the partition seed and the tensor's name and size, so it can be regenerated
  from a coefficient file alone.
* ``atlas:K`` -- aTLAS×K as the reference code draws it (``composition.py`` of
  fredzzhang/atlas): only 2-D tensors get coefficients (the others keep θ0), every element's
  group is drawn independently with ``randint(K)`` (groups of unequal sizes), and tensors of
  the same shape share one mask. The mask of a shape depends only on the partition seed and
  the shape.

A partition is a description; :class:`Packing` turns it into the flat layout the learner
computes in (each block's elements contiguous, padded to whole chunks).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from tvtool.errors import InvalidInputError

GRANULARITY_KINDS = ("task", "tensor", "layer", "random", "atlas")
# Granularities that split a tensor's elements into K groups (a tensor owns K columns).
GROUPED_KINDS = ("random", "atlas")
_LAYER_RE = re.compile(r"^(.*?\b(?:resblocks|blocks|layers)\.\d+)\.")
_CHUNK_CHOICES = tuple(2**i for i in range(16, -1, -1))  # 65536 … 1
_CHUNK_OVERHEAD = 2048


@dataclass(frozen=True)
class Granularity:
    """How tensors are split into coefficient blocks.

    Attributes:
        kind: ``task``, ``tensor``, ``layer``, ``random`` or ``atlas``.
        k: Number of groups per tensor for ``random`` and ``atlas``; None otherwise.
    """

    kind: str
    k: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}" if self.kind in GROUPED_KINDS else self.kind

    @property
    def grouped(self) -> bool:
        """Whether tensors are split into K element groups (``random:K``, ``atlas:K``)."""
        return self.kind in GROUPED_KINDS


def parse_granularity(text: str) -> Granularity:
    """Parse ``task``, ``tensor``, ``layer``, ``random:K`` or ``atlas:K``.

    Raises:
        InvalidInputError: anything else (K must be a positive integer).
    """
    value = text.strip().lower()
    if value in ("task", "tensor", "layer"):
        return Granularity(value)
    for kind in GROUPED_KINDS:
        if value.startswith(f"{kind}:"):
            count = value[len(kind) + 1:]
            if count.isdigit() and int(count) >= 1:
                return Granularity(kind, int(count))
    raise InvalidInputError(f"unknown granularity {text!r}",
                            hint="use task, tensor, layer, random:K or atlas:K (K a positive "
                                 "integer)")


@dataclass(frozen=True)
class TensorSpec:
    """Name and shape of one tensor covered by a partition."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def layer_of(name: str, prefix: str = "visual.") -> str:
    """The ``layer`` block a tensor belongs to (see the module docstring).

    Args:
        name: Full tensor name, e.g. ``visual.transformer.resblocks.3.attn.in_proj_weight``.
        prefix: The encoder prefix; tensors directly under it form their own block.
    """
    match = _LAYER_RE.match(name)
    if match:
        return match.group(1)
    local = name[len(prefix):] if name.startswith(prefix) else name
    if "." not in local:
        return name
    return name.rsplit(".", 1)[0]


def random_groups(name: str, numel: int, k: int, seed: int) -> Tensor:
    """Element indices of one tensor in group order, for ``random:K``.

    Group ``g`` is ``order[bounds[g]:bounds[g + 1]]`` with ``bounds = group_bounds(numel, k)``.
    The permutation depends only on ``(seed, name, numel)``, never on the other tensors.

    Returns:
        A permutation of ``range(numel)`` as int64.
    """
    digest = hashlib.sha256(f"tvtool-atlas\x1f{seed}\x1f{name}\x1f{numel}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(numel, generator=generator)


def group_bounds(numel: int, k: int) -> list[int]:
    """Boundaries of ``k`` near-equal groups of ``numel`` elements (sizes differ by <= 1)."""
    return [(g * numel) // k for g in range(k + 1)]


def shape_mask(shape: tuple[int, ...], k: int, seed: int) -> Tensor:
    """The ``atlas:K`` group of every element of a tensor of ``shape`` (int64, flat).

    As the reference's ``torch.randint(K, p.shape)``: each element's group drawn uniformly and
    independently, so group sizes differ. The draw depends only on ``(seed, shape)``: every
    tensor of that shape shares it (the reference keys its masks by shape).
    """
    digest = hashlib.sha256(f"tvtool-atlas-xk\x1f{seed}\x1f{list(shape)}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randint(k, (math.prod(shape),), generator=generator)


def element_groups(spec: TensorSpec, granularity: Granularity, seed: int
                   ) -> tuple[Tensor, list[int]]:
    """A grouped tensor's elements in group order, and each group's size.

    Returns:
        ``(order, sizes)``: ``order`` a permutation of ``range(numel)`` listing group 0's
        elements, then group 1's, ...; ``sizes[g]`` the size of group ``g`` (K entries).
    """
    k = granularity.k or 1
    if granularity.kind == "random":
        bounds = group_bounds(spec.numel, k)
        return random_groups(spec.name, spec.numel, k, seed), [b - a for a, b in _pairs(bounds)]
    mask = shape_mask(spec.shape, k, seed)
    return torch.argsort(mask, stable=True), torch.bincount(mask, minlength=k).tolist()


@dataclass(frozen=True)
class Partition:
    """Every element of a set of tensors assigned to one coefficient block.

    Build with :func:`build_partition`.

    Attributes:
        granularity: How the blocks were formed.
        seed: Seed of the random split (``random:K`` and ``atlas:K``; 0 otherwise).
        tensors: Covered tensors in a fixed order (the order of the vectors' files).
        block_names: One name per block (column of the coefficient matrix).
        tensor_blocks: For whole-tensor granularities, the block of each tensor; empty for
            ``random:K`` and ``atlas:K`` (there tensor ``i`` owns blocks ``i*K … i*K+K-1``).
    """

    granularity: Granularity
    seed: int
    tensors: tuple[TensorSpec, ...]
    block_names: tuple[str, ...]
    tensor_blocks: tuple[int, ...] = field(default=())

    @property
    def num_blocks(self) -> int:
        """Number of blocks (coefficients per vector)."""
        return len(self.block_names)

    @cached_property
    def index(self) -> dict[str, int]:
        """Position of each covered tensor by name."""
        return {spec.name: i for i, spec in enumerate(self.tensors)}

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def element_blocks(self, name: str) -> Tensor:
        """The block id of every element of tensor ``name`` (int64, the tensor's shape)."""
        position = self.index[name]
        spec = self.tensors[position]
        if not self.granularity.grouped:
            return torch.full(spec.shape, self.tensor_blocks[position], dtype=torch.int64)
        k = self.granularity.k or 1
        order, sizes = element_groups(spec, self.granularity, self.seed)
        ids = torch.empty(spec.numel, dtype=torch.int64)
        ids[order] = position * k + torch.repeat_interleave(
            torch.arange(k), torch.tensor(sizes, dtype=torch.int64), output_size=spec.numel)
        return ids.view(spec.shape)

    def tensor_coefficients(self, coefficients: Tensor, name: str) -> Tensor:
        """Coefficients of every vector for tensor ``name``, ready to multiply its elements.

        Args:
            coefficients: ``[num_vectors, num_blocks]``.
            name: A covered tensor.

        Returns:
            ``[num_vectors, 1, …, 1]`` (one value per vector, broadcastable over the tensor)
            for whole-tensor granularities, ``[num_vectors, *shape]`` for ``random:K`` and
            ``atlas:K``.
        """
        spec = self.tensors[self.index[name]]
        if not self.granularity.grouped:
            column = coefficients[:, self.tensor_blocks[self.index[name]]]
            return column.reshape(-1, *([1] * len(spec.shape)))
        return coefficients[:, self.element_blocks(name)]


def build_partition(tensors: Sequence[TensorSpec], granularity: Granularity | str,
                    seed: int = 0, prefix: str = "visual.") -> Partition:
    """Assign the elements of ``tensors`` to blocks.

    Args:
        tensors: The tensors the coefficients scale, in a fixed order.
        granularity: A :class:`Granularity` or its text form.
        seed: Seed of the ``random:K`` split (ignored otherwise).
        prefix: Encoder prefix used by the ``layer`` rule.

    ``atlas:K`` keeps only the 2-D tensors of ``tensors`` (the reference scales nothing else).

    Raises:
        InvalidInputError: no tensors (for ``atlas:K``: no 2-D tensor), duplicate names, or a
            bad granularity.
    """
    gran = parse_granularity(granularity) if isinstance(granularity, str) else granularity
    specs = tuple(TensorSpec(t.name, tuple(int(s) for s in t.shape)) for t in tensors)
    if gran.kind == "atlas":
        specs = tuple(s for s in specs if len(s.shape) == 2)
        if not specs and tensors:
            raise InvalidInputError("atlas:K scales 2-D tensors only and there are none",
                                    hint="use random:K or tensor")
    if not specs:
        raise InvalidInputError("no tensors to learn coefficients for")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidInputError("duplicate tensor names in the partition")
    if gran.grouped:
        k = gran.k or 1
        blocks = tuple(f"{s.name}#{g}" for s in specs for g in range(k))
        return Partition(gran, seed, specs, blocks)
    if gran.kind == "task":
        return Partition(gran, 0, specs, ("all",), tuple(0 for _ in specs))
    if gran.kind == "tensor":
        return Partition(gran, 0, specs, tuple(names), tuple(range(len(specs))))
    block_of: dict[str, int] = {}
    ids = []
    for name in names:
        layer = layer_of(name, prefix)
        ids.append(block_of.setdefault(layer, len(block_of)))
    return Partition(gran, 0, specs, tuple(block_of), tuple(ids))


# ---------------------------------------------------------------------------------------------
# Packed layout
# ---------------------------------------------------------------------------------------------


def _choose_chunk(segments: Sequence[int]) -> int:
    """The chunk size with the least work: padded elements plus a per-chunk overhead.

    Every chunk is one entry of a batched matrix product, which costs about as much as
    ``_CHUNK_OVERHEAD`` elements of data (kernel bookkeeping, CPU loop per entry); padding costs
    its elements. Large models get chunks of 16–64 Ki elements with a few % of padding.
    """
    best = (math.inf, 1)
    for chunk in _CHUNK_CHOICES:
        padded = sum(-(-s // chunk) * chunk for s in segments)
        best = min(best, (padded + (padded // chunk) * _CHUNK_OVERHEAD, -chunk))
    return -best[1]


class Packing:
    """The flat, chunked layout the composed weights are computed in.

    Each block's elements are contiguous and every block (for ``random:K`` and ``atlas:K``:
    every group of a tensor; otherwise every tensor) is padded with zeros to a multiple of
    ``chunk`` elements, so each chunk belongs to one block and
    ``Σ_t λ[t, block(chunk)] · V[t, chunk, :]`` is one batched matrix product over chunks
    (chunk size: see :func:`_choose_chunk`). Whole-tensor
    layouts keep tensor order, so unpacking is a single ``split`` into views; grouped
    layouts need one gather back to element order.

    Attributes:
        partition: The partition it lays out.
        chunk: Elements per chunk.
        num_chunks: Number of chunks (``padded_numel == num_chunks * chunk``).
        chunk_block: Block id of every chunk (int64, ``[num_chunks]``).
    """

    def __init__(self, partition: Partition, chunk: int | None = None) -> None:
        self.partition = partition
        gran = partition.granularity
        groups: list[tuple[Tensor, list[int]]] = []
        if gran.grouped:
            k = gran.k or 1
            groups = [element_groups(s, gran, partition.seed) for s in partition.tensors]
            segments = [size for _, sizes in groups for size in sizes]
            segment_blocks = list(range(len(partition.tensors) * k))
        else:
            segments = [s.numel for s in partition.tensors]
            segment_blocks = list(partition.tensor_blocks)
        self.chunk = chunk or _choose_chunk(segments)
        padded = [-(-s // self.chunk) * self.chunk for s in segments]
        self._segments = segments
        self._padded = padded
        self.num_chunks = sum(padded) // self.chunk
        self.chunk_block = torch.repeat_interleave(
            torch.tensor(segment_blocks, dtype=torch.int64),
            torch.tensor([p // self.chunk for p in padded], dtype=torch.int64))
        self.numel = sum(segments)
        self._gather: Tensor | None = None
        if gran.grouped:
            self._gather = self._element_positions(groups)

    @property
    def padded_numel(self) -> int:
        """Length of the packed flat layout."""
        return self.num_chunks * self.chunk

    def _element_positions(self, groups: Sequence[tuple[Tensor, list[int]]]) -> Tensor:
        """Packed position of every element, in tensor order (grouped granularities only)."""
        k = self.partition.granularity.k or 1
        index_dtype = torch.int32 if self.padded_numel < 2**31 else torch.int64
        positions = torch.empty(self.numel, dtype=index_dtype)
        offset = 0  # start of the tensor in element order
        group_starts = torch.tensor([0, *self._padded], dtype=torch.int64).cumsum(0)
        for index, (spec, (order, sizes)) in enumerate(zip(self.partition.tensors, groups,
                                                           strict=True)):
            size_tensor = torch.tensor(sizes, dtype=torch.int64)
            groups_of = torch.repeat_interleave(torch.arange(k), size_tensor,
                                                output_size=spec.numel)
            bounds = torch.cat([torch.zeros(1, dtype=torch.int64), size_tensor.cumsum(0)])
            # Element order[i] sits at its group's packed start plus its rank inside the group.
            local = torch.empty(spec.numel, dtype=torch.int64)
            local[order] = (group_starts[index * k + groups_of] + torch.arange(spec.numel)
                            - bounds[groups_of])
            positions[offset:offset + spec.numel] = local.to(index_dtype)
            offset += spec.numel
        return positions

    def pack(self, tensors: Mapping[str, Tensor], dtype: torch.dtype,
             out: Tensor | None = None) -> Tensor:
        """Lay tensors out flat (missing tensors and padding are zero).

        Args:
            tensors: Tensors by full name; names outside the partition are ignored.
            dtype: Dtype of the packed result.
            out: Optional ``[padded_numel]`` buffer to fill (e.g. a row of the vector stack).

        Raises:
            InvalidInputError: a tensor whose shape differs from the partition's.
        """
        flat = out if out is not None else torch.empty(self.padded_numel, dtype=dtype)
        flat.zero_()
        parts = []
        for spec in self.partition.tensors:
            tensor = tensors.get(spec.name)
            if tensor is not None and tuple(tensor.shape) != spec.shape:
                raise InvalidInputError(f"tensor {spec.name!r} has shape {tuple(tensor.shape)}, "
                                        f"expected {spec.shape}")
            parts.append(tensor)
        if self._gather is None:
            start = 0
            for tensor, spec, size in zip(parts, self.partition.tensors, self._padded,
                                          strict=True):
                if tensor is not None:
                    flat[start:start + spec.numel].copy_(tensor.reshape(-1))
                start += size
            return flat
        offset = 0
        for tensor, spec in zip(parts, self.partition.tensors, strict=True):
            if tensor is not None:
                where = self._gather[offset:offset + spec.numel].to(flat.device).long()
                flat.index_copy_(0, where, tensor.reshape(-1).to(flat.device, flat.dtype))
            offset += spec.numel
        return flat

    def unpack(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of a packed vector in the tensors' shapes.

        Differentiable; no copies but the one gather of ``random:K`` / ``atlas:K``.
        """
        specs = self.partition.tensors
        if self._gather is None:
            sizes: list[int] = []
            for spec, size in zip(specs, self._padded, strict=True):
                sizes += [spec.numel, size - spec.numel]
            pieces = flat.split(sizes)
            return {spec.name: pieces[2 * i].view(spec.shape) for i, spec in enumerate(specs)}
        ordered = flat.index_select(0, self._gather)
        pieces = ordered.split([s.numel for s in specs])
        return {spec.name: piece.view(spec.shape)
                for spec, piece in zip(specs, pieces, strict=True)}

    def to(self, device: torch.device | str) -> Packing:
        """Move the index tensors to ``device`` (in place; returns self)."""
        self.chunk_block = self.chunk_block.to(device)
        if self._gather is not None:
            self._gather = self._gather.to(device)
        return self


def _pairs(bounds: Sequence[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(bounds))
