"""tvtool.vectors.combine: the one streaming combination behind apply/negate/eval and merge."""

from __future__ import annotations

import pytest
import torch

from tvtool.errors import InvalidInputError, NumericalError
from tvtool.io import DictSource, open_tensors, write_tensors
from tvtool.merge import merge_state_dicts
from tvtool.metadata import FileMeta, Kind
from tvtool.vectors import align_vectors, plan_combine

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _vectors(dtype: torch.dtype, count: int = 3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(count):
        big = (torch.randn(4096, generator=gen, dtype=torch.float64) * 3).to(dtype)
        big[::5] = 0.0
        out.append({"visual.proj": big, "ln.bias": torch.randn(3, 4, generator=gen).to(dtype)})
    return out


@pytest.mark.parametrize("dtype", FLOATS)
def test_weighted_sum_of_vectors_equals_merge_task_arithmetic(dtype):
    # The vector sum eval and negate stream (plan_combine without a base) and merge's
    # task_arithmetic are one computation: same accumulation dtype, same order, same cast.
    vectors, coefs = _vectors(dtype), [0.3, -1.25, 2.0]
    pairs = [(DictSource(v), c) for v, c in zip(vectors, coefs, strict=True)]
    combined = dict(plan_combine(None, pairs).tensors())
    merged = merge_state_dicts(vectors, "task_arithmetic", coefs)
    assert list(combined) == list(merged)
    for name, tensor in combined.items():
        assert tensor.dtype == merged[name].dtype == dtype
        assert torch.equal(tensor, merged[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_with_coefs_equals_apply_of_the_merged_vector_for_one_vector(tmp_path, dtype):
    # base + c·τ written by apply, and base + 1·(c·τ) where c·τ is merge's task_arithmetic of
    # the one vector, stored in the vector's dtype: equal where the scaled vector is exact
    # in that dtype (coefficients that are powers of two).
    base = {name: torch.randn(t.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            for name, t in _vectors(dtype, 1)[0].items()}
    vector = _vectors(dtype, 1)[0]
    for coef in (0.5, -2.0, 1.0):
        direct = dict(plan_combine(DictSource(base), [(DictSource(vector), coef)]).tensors())
        merged = merge_state_dicts([vector], "task_arithmetic", [coef])
        via_merge = dict(plan_combine(DictSource(base), [(DictSource(merged), 1.0)]).tensors())
        for name in base:
            assert torch.equal(direct[name], via_merge[name]), (coef, name)
    # And through files, as the commands write them.
    path = tmp_path / "v.safetensors"
    meta = FileMeta(kind=Kind.TASK_VECTOR)
    write_tensors(str(path), vector, meta.to_header())
    source = open_tensors(str(path))
    try:
        from_file = dict(plan_combine(DictSource(base), [(source, 0.5)]).tensors())
    finally:
        source.close()
    for name in base:
        assert torch.equal(from_file[name],
                           dict(plan_combine(DictSource(base),
                                             [(DictSource(vector), 0.5)]).tensors())[name])


def test_alignment_policies_and_promotion():
    a = DictSource({"x": torch.ones(3), "y": torch.ones(2)}, label="a")
    b = DictSource({"x": torch.ones(3).double(), "z": torch.ones(1)}, label="b")
    with pytest.raises(InvalidInputError, match="hold different tensors") as refused:
        align_vectors([a, b], missing="refuse", refuse_hint="try --missing-as-zero")
    assert refused.value.hint == "try --missing-as-zero"
    union = align_vectors([a, b], missing="zero", promote=True)
    assert [i.name for i in union.layout] == ["x", "y", "z"]
    assert union.present == {"x": (0, 1), "y": (0,), "z": (1,)}
    assert union.layout[0].dtype == torch.float64  # promoted
    common = align_vectors([a, b], missing="common", promote=True)
    assert [i.name for i in common.layout] == ["x"] and common.dropped == 2
    # Without promotion (apply, negate, eval) differing dtypes are refused.
    with pytest.raises(InvalidInputError, match="one precision"):
        align_vectors([a, b], missing="zero")


def test_alignment_onto_a_base_keeps_the_base_layout_and_refuses_extra_tensors():
    base = DictSource({"x": torch.ones(3), "y": torch.ones(2), "step": torch.tensor([1])},
                      label="base")
    vector = DictSource({"y": torch.ones(2)}, label="v")
    aligned = align_vectors([vector], base)
    assert [i.name for i in aligned.layout] == ["x", "y", "step"]
    assert aligned.present == {"x": (), "y": (0,), "step": ()}
    with pytest.raises(InvalidInputError, match="not in the base"):
        align_vectors([DictSource({"w": torch.ones(1)}, label="w")], base)
    with pytest.raises(InvalidInputError, match="has shape"):
        align_vectors([DictSource({"x": torch.ones(4)}, label="w")], base)


def test_merge_and_apply_report_bad_inputs_and_overflow_alike():
    bad = {"x": torch.tensor([1.0, float("nan")])}
    good = {"x": torch.ones(2)}
    with pytest.raises(InvalidInputError, match="'x' contains NaN or Inf"):
        merge_state_dicts([good, bad])
    with pytest.raises(InvalidInputError, match="'x' contains NaN or Inf"):
        dict(plan_combine(None, [(DictSource(good), 1.0), (DictSource(bad), 1.0)]).tensors())
    huge = {"x": torch.full((2,), 3e38)}
    with pytest.raises(NumericalError, match="overflow"):
        merge_state_dicts([huge, huge])
    with pytest.raises(NumericalError, match="overflow"):
        dict(plan_combine(None, [(DictSource(huge), 1.0), (DictSource(huge), 1.0)]).tensors())
