"""tvtool.vectors: task-vector algebra (pure functions) and the streaming plans."""

from __future__ import annotations

import os
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvtool.errors import InvalidInputError
from tvtool.io import DictSource, open_tensors, write_tensors
from tvtool.metadata import FileMeta, Kind
from tvtool.vectors import (
    add,
    align_keys,
    apply,
    cosine_matrix,
    extract,
    negate,
    plan_combine,
    plan_extract,
    scale,
    state_dict_of,
    tensor_combine,
)

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Tolerance of apply(b, extract(b, f)) == f: one rounding of b + (f - b) in the accumulation
# dtype, then one cast to the stored dtype (see docs/format.md, "Numerics").
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3,
             torch.bfloat16: 1e-2}


@st.composite
def state_dicts(draw, dtype=None):
    """Small random state dicts: 1-4 tensors of 0-3 dims, one float dtype, plus an int buffer."""
    dtype = dtype or draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    names = draw(st.lists(st.sampled_from(["visual.proj", "visual.conv1.weight", "ln.bias",
                                           "logit_scale", "text_projection"]),
                          min_size=1, max_size=4, unique=True))
    out = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
        out[name] = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    out["counter"] = torch.tensor([seed % 7])
    return out


@st.composite
def base_and_finetuned(draw):
    base = draw(state_dicts())
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    step = draw(st.sampled_from([1e-3, 0.1, 1.0]))
    finetuned = {k: ((v.double() + step * torch.randn(v.shape, generator=gen, dtype=torch.float64))
                     .to(v.dtype) if v.is_floating_point() else v.clone())
                 for k, v in base.items()}
    return base, finetuned


@settings(max_examples=60, deadline=None)
@given(state_dicts())
def test_extract_of_a_model_from_itself_is_zero(base):
    vector = extract(base, base)
    assert set(vector) == {k for k, v in base.items() if v.is_floating_point()}
    for name, delta in vector.items():
        assert delta.dtype == base[name].dtype
        assert not bool(delta.any())


@settings(max_examples=60, deadline=None)
@given(base_and_finetuned())
def test_apply_of_extract_restores_the_finetuned_model(pair):
    base, finetuned = pair
    restored = apply(base, [extract(base, finetuned)], [1.0])
    assert set(restored) == set(finetuned)
    for name, tensor in finetuned.items():
        assert restored[name].dtype == tensor.dtype
        if not tensor.is_floating_point():
            assert torch.equal(restored[name], tensor)
            continue
        tol = TOLERANCE[tensor.dtype]
        torch.testing.assert_close(restored[name], tensor, rtol=tol, atol=tol * 10)


@settings(max_examples=60, deadline=None)
@given(state_dicts())
def test_negate_twice_is_bit_exact(base):
    vector = {k: v for k, v in base.items() if v.is_floating_point()}
    twice = negate(negate(vector))
    for name, tensor in vector.items():
        assert torch.equal(twice[name].view(torch.uint8) if tensor.dim() else twice[name],
                           tensor.view(torch.uint8) if tensor.dim() else tensor)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state_dicts(), st.booleans())
def test_save_load_round_trip_is_bit_exact(tmp_path, tensors, with_meta):
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture="x", dataset="d",
                    provenance={"seed": 1}).to_header() if with_meta else {}
    path = tmp_path / "rt.safetensors"
    write_tensors(str(path), tensors, meta)
    source = open_tensors(str(path))
    try:
        assert source.metadata == meta
        assert source.keys() == list(tensors)
        for name, tensor in tensors.items():
            got = source.get(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert got.contiguous().view(-1).view(torch.uint8).tolist() == \
                tensor.contiguous().view(-1).view(torch.uint8).tolist()
    finally:
        source.close()


@settings(max_examples=40, deadline=None)
@given(base_and_finetuned(), st.floats(-3, 3, allow_nan=False))
def test_streaming_plans_agree_with_pure_functions(pair, coef):
    base, finetuned = pair
    plan = plan_extract(DictSource(base), DictSource(finetuned))
    streamed = dict(plan.tensors())
    pure = extract(base, finetuned)
    assert streamed.keys() == pure.keys()
    assert all(torch.equal(streamed[k], pure[k]) for k in pure)
    combined = dict(plan_combine(DictSource(base), [(DictSource(pure), coef)]).tensors())
    expected = apply(base, [pure], [coef])
    assert all(torch.equal(combined[k], expected[k]) for k in base)
    summed = dict(plan_combine(None, [(DictSource(pure), coef), (DictSource(pure), 1.0)])
                  .tensors())
    pure_sum = add([pure, pure], [coef, 1.0])
    assert all(torch.equal(summed[k], pure_sum[k]) for k in pure)


def test_combining_never_modifies_or_aliases_inputs():
    a, b = torch.ones(3), torch.full((3,), 2.0)
    keep_a, keep_b = a.clone(), b.clone()
    out = tensor_combine(None, [a, b], [1.0, 1.0], torch.float32)
    assert torch.equal(a, keep_a) and torch.equal(b, keep_b)
    assert out.data_ptr() not in (a.data_ptr(), b.data_ptr())
    scaled = scale({"a": a}, 1.0)
    assert scaled["a"].data_ptr() != a.data_ptr()
    summed = dict(plan_combine(None, [(DictSource({"a": a}), 1.0),
                                      (DictSource({"a": b}), 1.0)]).tensors())
    assert torch.equal(summed["a"], torch.full((3,), 3.0))
    assert torch.equal(a, keep_a)


def test_scale_add_negate_values():
    v = {"w": torch.tensor([1.0, -2.0])}
    assert torch.equal(scale(v, 0.5)["w"], torch.tensor([0.5, -1.0]))
    assert torch.equal(add([v, v], [1.0, -1.0])["w"], torch.zeros(2))
    assert torch.equal(negate(v)["w"], torch.tensor([-1.0, 2.0]))


def test_mismatches_are_invalid_input():
    v32 = {"w": torch.ones(2)}
    with pytest.raises(InvalidInputError, match="different tensors: 1 only in"):
        add([v32, {"x": torch.ones(2)}])
    with pytest.raises(InvalidInputError, match="shape"):
        add([v32, {"w": torch.ones(3)}])
    with pytest.raises(InvalidInputError, match="dtype"):
        add([v32, {"w": torch.ones(2, dtype=torch.float16)}])
    with pytest.raises(InvalidInputError, match="not in the base"):
        apply({"x": torch.ones(2)}, [v32])
    with pytest.raises(InvalidInputError, match="dtype"):
        apply({"w": torch.ones(2, dtype=torch.float64)}, [v32])
    with pytest.raises(InvalidInputError, match="not floating point"):
        apply({"w": torch.ones(2, dtype=torch.int64)}, [{"w": torch.ones(2, dtype=torch.int64)}])
    with pytest.raises(InvalidInputError, match="not in the base"):
        extract({}, v32)
    with pytest.raises(InvalidInputError, match="at least one"):
        add([])


def test_plan_extract_reports_prefixes_missing_and_extra_keys():
    base = {"a": torch.zeros(2), "b": torch.zeros(3), "n": torch.tensor([1])}
    wrapped = {"module.a": torch.ones(2), "module.b": torch.ones(3), "module.n": torch.tensor([1])}
    plan = plan_extract(DictSource(base), DictSource(wrapped))
    assert [i.name for i in plan.layout] == ["a", "b"]
    assert any("'module.'" in note for note in plan.notes)
    with pytest.raises(InvalidInputError, match=r"lacks 1 tensors of the base, e\.g\. \['b'\]"):
        plan_extract(DictSource(base), DictSource({"a": torch.ones(2)}))
    partial = plan_extract(DictSource(base), DictSource({"a": torch.ones(2)}), allow_missing=True)
    assert [i.name for i in partial.layout] == ["a"]
    with pytest.raises(InvalidInputError, match=r"has 2 tensors that are not in the base"):
        plan_extract(DictSource(base), DictSource({**base, "x": torch.ones(1),
                                                   "y": torch.ones(1)}))
    with pytest.raises(InvalidInputError, match="shape"):
        plan_extract(DictSource(base), DictSource({**base, "a": torch.ones(5)}))
    with pytest.raises(InvalidInputError, match="dtype"):
        plan_extract(DictSource(base), DictSource({**base, "a": torch.ones(2).double()}))
    with pytest.raises(InvalidInputError, match="would be empty"):
        plan_extract(DictSource(base), DictSource(base), keep="changed")
    with pytest.raises(InvalidInputError, match="--keep"):
        plan_extract(DictSource(base), DictSource(base), keep="some")


def test_nan_inputs_are_reported_when_read():
    base = {"a": torch.zeros(2)}
    bad = {"a": torch.tensor([0.0, float("nan")])}
    plan = plan_extract(DictSource(base), DictSource(bad, label="ft"))
    with pytest.raises(InvalidInputError, match="ft: tensor 'a' contains NaN"):
        dict(plan.tensors())
    combine = plan_combine(DictSource(base), [(DictSource(bad, label="v"), 1.0)])
    with pytest.raises(InvalidInputError, match="NaN"):
        dict(combine.tensors())


def test_plan_combine_checks_before_reading():
    base = DictSource({"a": torch.zeros(2), "i": torch.tensor([1])})
    with pytest.raises(InvalidInputError, match="not in the base"):
        plan_combine(base, [(DictSource({"z": torch.ones(1)}), 1.0)])
    with pytest.raises(InvalidInputError, match="shape"):
        plan_combine(base, [(DictSource({"a": torch.ones(3)}), 1.0)])
    with pytest.raises(InvalidInputError, match="float16"):
        plan_combine(base, [(DictSource({"a": torch.ones(2).half()}), 1.0)])
    with pytest.raises(InvalidInputError, match="floating tensors only"):
        plan_combine(base, [(DictSource({"i": torch.tensor([1])}), 1.0)])
    with pytest.raises(InvalidInputError, match="different tensors"):
        plan_combine(None, [(DictSource({"a": torch.ones(2)}), 1.0),
                            (DictSource({"b": torch.ones(2)}), 1.0)], allow_subset=False)
    union = plan_combine(None, [(DictSource({"a": torch.ones(2)}), 1.0),
                                (DictSource({"b": torch.ones(2)}), 2.0)])
    assert {k: v.tolist() for k, v in union.tensors()} == {"a": [1.0, 1.0], "b": [2.0, 2.0]}
    full = dict(plan_combine(base, [(DictSource({"a": torch.ones(2)}), 0.5)]).tensors())
    assert full["a"].tolist() == [0.5, 0.5] and full["i"].tolist() == [1]


def test_cosine_matrix():
    a = DictSource({"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0])})
    b = DictSource({"x": torch.tensor([0.0, 2.0])})
    c = DictSource({"x": torch.tensor([-3.0, 0.0]), "y": torch.tensor([0.0])})
    zero = DictSource({"x": torch.zeros(2)})
    matrix = cosine_matrix([a, b, c, zero])
    assert matrix[0][0] == pytest.approx(1.0)
    assert matrix[0][1] == pytest.approx(0.0)
    assert matrix[0][2] == pytest.approx(-1.0)
    assert matrix[2][0] == pytest.approx(-1.0)
    assert matrix[3] == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(InvalidInputError, match="different shapes"):
        cosine_matrix([a, DictSource({"x": torch.ones(3)})])


def test_align_keys():
    assert align_keys(["model.a"], ["a"]) == ({"model.a": "a"}, "model.")
    assert align_keys(["module.model.a"], ["a"]) == ({"module.model.a": "a"}, "module.model.")
    assert align_keys(["a", "model.b"], ["a", "b"]) == ({"a": "a", "model.b": "model.b"}, None)


def test_state_dict_of():
    assert list(state_dict_of(DictSource({"a": torch.ones(1)}))) == ["a"]


class _Tracker:
    """Counts how many tensors handed out by any tracked source are still alive."""

    def __init__(self) -> None:
        self.alive: list[weakref.ref] = []
        self.max_alive = 0

    def note(self, tensor: torch.Tensor) -> torch.Tensor:
        self.alive = [r for r in self.alive if r() is not None]
        self.max_alive = max(self.max_alive, len(self.alive))
        self.alive.append(weakref.ref(tensor))
        return tensor


class _TrackedSource(DictSource):
    def __init__(self, tensors, tracker: _Tracker) -> None:
        super().__init__(tensors)
        self.tracker = tracker

    def get(self, name):
        return self.tracker.note(super().get(name).clone())


def test_plans_hold_one_input_tensor_at_a_time():
    gen = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.randn(8, generator=gen) for i in range(6)}
    tracker = _Tracker()
    vectors = [(_TrackedSource({k: torch.randn(8, generator=gen) for k in base}, tracker), 0.5)
               for _ in range(5)]
    plan = plan_combine(_TrackedSource(base, tracker), vectors)
    for _name, _tensor in plan.tensors():
        pass  # a writer drops each output before asking for the next
    assert tracker.max_alive <= 1
    ft = _TrackedSource({k: v + 1 for k, v in base.items()}, tracker)
    for _name, _tensor in plan_extract(_TrackedSource(base, tracker), ft).tensors():
        pass
    assert tracker.max_alive <= 1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_reading_a_file_does_not_keep_its_pages_resident(tmp_path):
    # 16 tensors of 4 MiB: a memory-mapped reader would grow the RSS by ~64 MiB.
    path = tmp_path / "big.safetensors"
    write_tensors(str(path), {f"t{i}": torch.full((1 << 20,), float(i)) for i in range(16)})
    source = open_tensors(str(path))
    try:
        names = source.keys()
        source.get(names[0])
        before = _rss_bytes()
        for name in names:
            tensor = source.get(name)
            assert float(tensor[0]) == float(name[1:])
            del tensor
        grown = _rss_bytes() - before
        with open("/proc/self/maps") as handle:
            mapped = str(path) in handle.read()
    finally:
        source.close()
    assert not mapped, "the reader must not memory-map inputs (mapped pages stay resident)"
    assert grown < 24 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"


def test_plan_extract_keeps_the_image_encoder_and_says_what_it_left_out():
    base = {"visual.a": torch.zeros(2), "visual.b": torch.zeros(3), "text.c": torch.zeros(2),
            "ln_final.d": torch.zeros(1)}
    tuned = {"visual.a": torch.ones(2), "visual.b": torch.zeros(3),
             "text.c": torch.tensor([0.0, 2.0]), "ln_final.d": torch.zeros(1)}
    plan = plan_extract(DictSource(base), DictSource(tuned), keep="image")
    assert [i.name for i in plan.layout] == ["visual.a", "visual.b"]
    assert torch.equal(dict(plan.tensors())["visual.a"], torch.ones(2))
    # text.c changed and is not kept: a note says so (ln_final.d did not change).
    assert any("1 tensors outside the image encoder differ" in n and "--keep all" in n
               for n in plan.notes)
    # A checkpoint of the image encoder alone needs no --allow-missing...
    visual = {k: v for k, v in tuned.items() if k.startswith("visual.")}
    assert len(plan_extract(DictSource(base), DictSource(visual), keep="image").layout) == 2
    # ...but one lacking an image-encoder tensor does.
    with pytest.raises(InvalidInputError, match="lacks 1 tensors of the base's image encoder"):
        plan_extract(DictSource(base), DictSource({"visual.a": torch.ones(2)}), keep="image")
    with pytest.raises(InvalidInputError, match=r"would be empty.*visual"):
        plan_extract(DictSource({"text.c": torch.zeros(2)}),
                     DictSource({"text.c": torch.ones(2)}), keep="image")
    assert {i.name for i in plan_extract(DictSource(base), DictSource(tuned), keep="changed")
            .layout} == {"visual.a", "text.c"}
    assert len(plan_extract(DictSource(base), DictSource(tuned), keep="all").layout) == 4
