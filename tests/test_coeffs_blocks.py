"""aTLAS blocks, the packed layout and the fused composition (tvtool.atlas.blocks/compose)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tvtool.atlas import (
    ComposedEncoder,
    Packing,
    TensorSpec,
    VectorStack,
    build_partition,
    compose_state,
    layer_of,
    parse_granularity,
)
from tvtool.errors import InvalidInputError

SPECS = [
    TensorSpec("visual.class_embedding", (8,)),
    TensorSpec("visual.conv1.weight", (8, 3, 2, 2)),
    TensorSpec("visual.ln_pre.weight", (8,)),
    TensorSpec("visual.ln_pre.bias", (8,)),
    TensorSpec("visual.transformer.resblocks.0.attn.in_proj_weight", (24, 8)),
    TensorSpec("visual.transformer.resblocks.0.mlp.c_fc.bias", (32,)),
    TensorSpec("visual.transformer.resblocks.1.ln_1.weight", (8,)),
    TensorSpec("visual.proj", (8, 4)),
]


def naive_delta(specs, vectors, coefficients, partition):
    """The per-tensor, per-vector loop of the reference code (the yardstick)."""
    out = {}
    for spec in specs:
        blocks = partition.element_blocks(spec.name)
        acc = torch.zeros(spec.shape)
        for t, vector in enumerate(vectors):
            if spec.name in vector:
                acc = acc + coefficients[t][blocks] * vector[spec.name]
        out[spec.name] = acc
    return out


def test_parse_granularity():
    assert str(parse_granularity("tensor")) == "tensor"
    assert parse_granularity("random:4").k == 4
    assert str(parse_granularity("RANDOM:2")) == "random:2"
    for bad in ("random:0", "random:x", "random", "block", ""):
        with pytest.raises(InvalidInputError, match="granularity"):
            parse_granularity(bad)


def test_block_names_per_granularity():
    assert build_partition(SPECS, "task").block_names == ("all",)
    assert build_partition(SPECS, "tensor").block_names == tuple(s.name for s in SPECS)
    layer = build_partition(SPECS, "layer")
    assert layer.block_names == ("visual.class_embedding", "visual.conv1", "visual.ln_pre",
                                 "visual.transformer.resblocks.0",
                                 "visual.transformer.resblocks.1", "visual.proj")
    assert layer_of("visual.transformer.resblocks.11.mlp.c_proj.bias") == \
        "visual.transformer.resblocks.11"
    rand = build_partition(SPECS, "random:3", seed=5)
    assert rand.num_blocks == 3 * len(SPECS)
    assert rand.block_names[:3] == ("visual.class_embedding#0", "visual.class_embedding#1",
                                    "visual.class_embedding#2")


def test_random_partition_is_deterministic_balanced_and_complete():
    a = build_partition(SPECS, "random:3", seed=7)
    b = build_partition(list(reversed(SPECS)), "random:3", seed=7)
    c = build_partition(SPECS, "random:3", seed=8)
    name = "visual.transformer.resblocks.0.attn.in_proj_weight"
    blocks_a = a.element_blocks(name)
    # Same seed: same split, whatever the order of the other tensors.
    position_a, position_b = a.index[name], b.index[name]
    assert torch.equal(blocks_a - 3 * position_a, b.element_blocks(name) - 3 * position_b)
    assert not torch.equal(blocks_a, c.element_blocks(name))
    counts = torch.bincount(blocks_a.reshape(-1) - 3 * position_a, minlength=3)
    assert counts.tolist() == [64, 64, 64]  # every element once, equal groups
    # Biases and norms are split too.
    ln = a.element_blocks("visual.ln_pre.weight") - 3 * a.index["visual.ln_pre.weight"]
    assert sorted(torch.bincount(ln, minlength=3).tolist()) == [2, 3, 3]


@pytest.mark.parametrize("granularity", ["task", "tensor", "layer", "random:3"])
def test_pack_unpack_roundtrip(granularity):
    partition = build_partition(SPECS, granularity, seed=1)
    packing = Packing(partition)
    tensors = {s.name: torch.randn(s.shape) for s in SPECS}
    packed = packing.pack(tensors, torch.float32)
    assert packed.numel() == packing.padded_numel
    assert packing.padded_numel % packing.chunk == 0
    assert float(packed.abs().sum()) == pytest.approx(
        sum(float(t.abs().sum()) for t in tensors.values()), rel=1e-5)
    unpacked = packing.unpack(packed)
    for name, tensor in tensors.items():
        assert torch.equal(unpacked[name], tensor)
    # Every chunk lies in one block: the chunk's block matches its elements' blocks.
    blocks = packing.pack({s.name: partition.element_blocks(s.name).float() + 1 for s in SPECS},
                          torch.float32).view(packing.num_chunks, packing.chunk)
    for chunk, block in enumerate(packing.chunk_block.tolist()):
        values = blocks[chunk][blocks[chunk] > 0]
        assert values.numel() == 0 or bool((values == block + 1).all())


@settings(max_examples=25, deadline=None)
@given(granularity=st.sampled_from(["task", "tensor", "layer", "random:1", "random:2",
                                    "random:5"]),
       count=st.integers(1, 4), seed=st.integers(0, 2**31), missing=st.booleans())
def test_fused_combine_matches_naive_loop(granularity, count, seed, missing):
    gen = torch.Generator().manual_seed(seed)
    partition = build_partition(SPECS, granularity, seed=seed % 97)
    vectors = [{s.name: torch.randn(s.shape, generator=gen) for s in SPECS}
               for _ in range(count)]
    if missing:
        del vectors[0][SPECS[1].name]  # a vector lacking a tensor counts as zero there
    stack = VectorStack(Packing(partition), vectors)
    coefficients = torch.randn(count, partition.num_blocks, generator=gen, requires_grad=True)
    fused = stack.packing.unpack(stack.combine(coefficients))
    reference_coefs = coefficients.detach().clone().requires_grad_(True)
    reference = naive_delta(SPECS, vectors, reference_coefs, partition)
    weights = {s.name: torch.randn(s.shape, generator=gen) for s in SPECS}
    for name in reference:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-5, atol=1e-5)
    sum((fused[n] * weights[n]).sum() for n in fused).backward()
    sum((reference[n] * weights[n]).sum() for n in reference).backward()
    torch.testing.assert_close(coefficients.grad, reference_coefs.grad, rtol=1e-4, atol=1e-4)


def test_compose_state_matches_fused_and_keeps_other_tensors():
    partition = build_partition(SPECS[:4], "random:2", seed=3)
    base = {s.name: torch.randn(s.shape) for s in SPECS}
    base["logit_scale"] = torch.tensor(4.0)
    vectors = [{s.name: torch.randn(s.shape) for s in SPECS} for _ in range(2)]
    coefficients = torch.randn(2, partition.num_blocks)
    state = compose_state(base, vectors, coefficients, partition)
    delta = naive_delta(SPECS[:4], vectors, coefficients, partition)
    for spec in SPECS[:4]:
        torch.testing.assert_close(state[spec.name], base[spec.name] + delta[spec.name])
    for spec in SPECS[4:]:
        assert state[spec.name] is base[spec.name]
    assert state["logit_scale"] is base["logit_scale"]


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_composed_encoder_runs_the_composed_weights():
    torch.manual_seed(0)
    module = _Tiny()
    specs = [TensorSpec(f"visual.{n}", tuple(p.shape)) for n, p in module.named_parameters()]
    vectors = [{s.name: 0.1 * torch.randn(s.shape) for s in specs} for _ in range(3)]
    partition = build_partition(specs, "tensor")
    encoder = ComposedEncoder(module, VectorStack(Packing(partition), vectors))
    coefficients = torch.randn(3, partition.num_blocks)
    x = torch.randn(5, 4)
    base = {f"visual.{n}": p.detach().clone() for n, p in module.named_parameters()}
    state = compose_state(base, vectors, coefficients, partition)
    expected = torch.func.functional_call(
        module, {n[len("visual."):]: t for n, t in state.items()}, (x,))
    torch.testing.assert_close(encoder(coefficients, x), expected)
    assert not any(p.requires_grad for p in module.parameters())


def test_composed_encoder_refuses_tensors_outside_the_encoder():
    module = _Tiny()
    specs = [TensorSpec("visual.a.weight", (6, 4)), TensorSpec("transformer.x", (2,))]
    partition = build_partition(specs, "tensor")
    stack = VectorStack(Packing(partition), [{}])
    with pytest.raises(InvalidInputError, match="not a parameter of the image encoder"):
        ComposedEncoder(module, stack)
    wrong = build_partition([TensorSpec("visual.a.weight", (4, 6))], "tensor")
    with pytest.raises(InvalidInputError, match="shape"):
        ComposedEncoder(module, VectorStack(Packing(wrong), [{}]))


def test_bf16_stack_halves_storage_and_stays_close():
    partition = build_partition(SPECS, "tensor")
    vectors = [{s.name: torch.randn(s.shape) for s in SPECS} for _ in range(2)]
    full = VectorStack(Packing(partition), vectors)
    half = VectorStack(Packing(partition), vectors, dtype=torch.bfloat16)
    assert half.data.element_size() * 2 == full.data.element_size()
    coefficients = torch.randn(2, partition.num_blocks)
    torch.testing.assert_close(half.combine(coefficients), full.combine(coefficients),
                               rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("granularity", ["tensor", "layer"])
def test_the_column_named_x_scales_tensor_x(granularity):
    # The documented rule (docs/coeffs.md, docs/format.md): the coefficient file's column
    # named X scales tensor X (tensor granularity) or every tensor of layer X. Written from the
    # names alone, not from tvtool's block ids: a partition whose ids are shifted against its
    # names must fail.
    partition = build_partition(SPECS, granularity)
    names = [s.name for s in SPECS]
    expected_columns = names if granularity == "tensor" else \
        list(dict.fromkeys(layer_of(n) for n in names))
    assert list(partition.block_names) == expected_columns

    def column_of(name: str) -> int:
        return expected_columns.index(name if granularity == "tensor" else layer_of(name))

    count = 2
    coefficients = torch.arange(1.0, 1.0 + count * partition.num_blocks).view(count, -1)
    vectors = [{s.name: torch.full(s.shape, float(10 ** t)) for s in SPECS}
               for t in range(count)]
    fused = Packing(partition).unpack(VectorStack(Packing(partition), vectors)
                                      .combine(coefficients))
    for spec in SPECS:
        want = sum(coefficients[t, column_of(spec.name)] * 10 ** t for t in range(count))
        assert torch.allclose(fused[spec.name], torch.full(spec.shape, float(want))), spec.name
        per_vector = partition.tensor_coefficients(coefficients, spec.name).reshape(count)
        assert per_vector.tolist() == coefficients[:, column_of(spec.name)].tolist()
