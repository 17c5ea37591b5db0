"""Merge algebra: properties of each method, equivalence with peft, exact trimming, DARE seeds."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils as peft_merge

from tvtool.errors import InvalidInputError, UsageError
from tvtool.merge import METHODS, get_method, merge_state_dicts
from tvtool.merge import method as merge_base
from tvtool.merge.trim import kth_largest_magnitude, tensor_threshold

FAST = settings(max_examples=25, deadline=None)

shapes = st.sampled_from([(7,), (3, 5), (2, 3, 4), (1,), (16, 9)])


@st.composite
def vector_sets(draw, min_n=1, max_n=4):
    """N task vectors with two tensors each (seeded random floats)."""
    n = draw(st.integers(min_n, max_n))
    shape_a, shape_b = draw(shapes), draw(shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(shape_a, generator=gen), "b": torch.randn(shape_b, generator=gen)}
            for _ in range(n)]


coef_values = st.floats(-3, 3, allow_nan=False, allow_infinity=False)


def close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=atol)


def plain_sum(vectors, coefs):
    return {n: sum(c * v[n].double() for v, c in zip(vectors, coefs, strict=True)).float()
            for n in vectors[0]}


# ---------------------------------------------------------------- registry


def test_registry_lists_every_method_with_a_paper():
    assert set(METHODS) == {"task_arithmetic", "mean", "ties", "dare", "magnitude", "tsv",
                            "iso-c", "iso-cts", "consensus", "breadcrumbs"}
    for name, method in METHODS.items():
        assert method.name == name
        assert "arXiv" in method.paper
        assert method.streaming
        method.make_params({})  # every parameter has a default


def test_unknown_method_and_params_are_usage_errors():
    with pytest.raises(UsageError, match="unknown merge method"):
        get_method("soup")
    with pytest.raises(UsageError, match="no parameter"):
        get_method("ties").make_params({"k": 3})
    with pytest.raises(UsageError, match="density"):
        get_method("dare").make_params({"density": 1.5})
    with pytest.raises(UsageError, match="trim"):
        get_method("magnitude").make_params({"trim": "layer"})


# ---------------------------------------------------------------- algebra


@FAST
@given(vector_sets(), coef_values)
def test_task_arithmetic_is_the_weighted_sum(vectors, alpha):
    merged = merge_state_dicts(vectors, "task_arithmetic", alpha)
    close(merged, plain_sum(vectors, [alpha] * len(vectors)), atol=1e-4)


@FAST
@given(vector_sets(), coef_values, coef_values)
def test_task_arithmetic_is_linear_in_alpha(vectors, alpha, beta):
    unit = merge_state_dicts(vectors, "task_arithmetic", 1.0)
    at_alpha = merge_state_dicts(vectors, "task_arithmetic", alpha)
    at_sum = merge_state_dicts(vectors, "task_arithmetic", alpha + beta)
    at_beta = merge_state_dicts(vectors, "task_arithmetic", beta)
    close(at_alpha, {n: alpha * t for n, t in unit.items()}, atol=1e-4)
    close(at_sum, {n: at_alpha[n] + at_beta[n] for n in unit}, atol=1e-4)


@FAST
@given(vector_sets(), st.lists(coef_values, min_size=4, max_size=4))
def test_mean_is_sum_over_n(vectors, coefs):
    coefs = coefs[: len(vectors)]
    mean = merge_state_dicts(vectors, "mean", coefs)
    total = merge_state_dicts(vectors, "task_arithmetic", coefs)
    close(mean, {n: t / len(vectors) for n, t in total.items()}, atol=1e-5)


@st.composite
def agreeing_vectors(draw):
    """Vectors whose entries share one sign pattern (no sign conflict) and are non-zero."""
    vectors = draw(vector_sets(min_n=1, max_n=4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    signs = {n: torch.where(torch.rand(t.shape, generator=gen) < 0.5, -1.0, 1.0)
             for n, t in vectors[0].items()}
    return [{n: (t.abs() + 0.01) * signs[n] for n, t in v.items()} for v in vectors]


@FAST
@given(agreeing_vectors(), st.floats(0.05, 3), st.sampled_from(["global", "tensor"]),
       st.sampled_from(["total", "frequency"]))
def test_ties_at_density_1_without_conflict_is_sum_or_mean(vectors, alpha, trim, sign):
    params = {"density": 1.0, "trim": trim, "sign": sign}
    as_sum = merge_state_dicts(vectors, "ties", alpha, {**params, "disjoint": "sum"})
    as_mean = merge_state_dicts(vectors, "ties", alpha, {**params, "disjoint": "mean"})
    expected = plain_sum(vectors, [alpha] * len(vectors))
    close(as_sum, expected, atol=1e-4)
    close(as_mean, {n: t / len(vectors) for n, t in expected.items()}, atol=1e-4)


@FAST
@given(vector_sets(min_n=2), st.floats(0.1, 0.9), st.sampled_from(["total", "frequency"]))
def test_ties_with_per_tensor_trim_equals_peft(vectors, density, sign):
    weights = [0.3, 0.7, 1.1, -0.4][: len(vectors)]
    ours = merge_state_dicts(vectors, "ties", weights,
                             {"density": density, "trim": "tensor", "sign": sign})
    for name in ours:
        theirs = peft_merge.ties([v[name] for v in vectors], torch.tensor(weights), density,
                                 majority_sign_method=sign)
        torch.testing.assert_close(ours[name], theirs, rtol=1e-5, atol=1e-6)


@FAST
@given(vector_sets(min_n=2), st.floats(0.1, 0.9))
def test_magnitude_with_per_tensor_trim_equals_peft(vectors, density):
    weights = [0.5, -1.0, 2.0, 0.25][: len(vectors)]
    ours = merge_state_dicts(vectors, "magnitude", weights, {"density": density, "trim": "tensor"})
    for name in ours:
        theirs = peft_merge.magnitude_prune([v[name] for v in vectors], torch.tensor(weights),
                                            density)
        torch.testing.assert_close(ours[name], theirs, rtol=1e-5, atol=1e-6)


@FAST
@given(vector_sets())
def test_task_arithmetic_equals_peft(vectors):
    weights = [0.5, -1.0, 2.0, 0.25][: len(vectors)]
    ours = merge_state_dicts(vectors, "task_arithmetic", weights)
    for name in ours:
        theirs = peft_merge.task_arithmetic([v[name] for v in vectors], torch.tensor(weights))
        torch.testing.assert_close(ours[name], theirs, rtol=1e-5, atol=1e-5)


def test_ties_elects_sign_before_weights_like_peft():
    # Entry 0: +1 (weight 0.1) against -0.6 (weight 1). The unweighted sum elects +, so only the
    # first vector survives although the weighted sum would be negative.
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([-0.6, 1.0])}
    merged = merge_state_dicts([a, b], "ties", [0.1, 1.0], {"density": 1.0})
    torch.testing.assert_close(merged["w"], torch.tensor([0.1, (0.2 + 1.0) / 2]))


def test_global_trim_keeps_the_top_of_the_whole_vector():
    big = {"big": torch.tensor([10.0, -9.0, 8.0, 7.0]), "small": torch.tensor([0.1, -0.2])}
    kept = merge_state_dicts([big], "magnitude", 1.0, {"density": 0.5, "trim": "global"})
    torch.testing.assert_close(kept["big"], torch.tensor([10.0, -9.0, 8.0, 0.0]))
    torch.testing.assert_close(kept["small"], torch.zeros(2))
    per_tensor = merge_state_dicts([big], "magnitude", 1.0, {"density": 0.5, "trim": "tensor"})
    torch.testing.assert_close(per_tensor["small"], torch.tensor([0.0, -0.2]))


@pytest.mark.parametrize("method", ["magnitude", "ties"])
def test_global_trim_ranks_the_image_encoder_on_its_own(method):
    # A whole-CLIP vector: 10 image-encoder entries and 30 text-tower entries that did not
    # change (the text tower is frozen during fine-tuning). Ranked over all 40 entries,
    # density 0.2 would keep 8 of the 10 image-encoder entries (0.8, not 0.2).
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(10, generator=gen)
    vector = {"visual.proj": image, "transformer.w": torch.zeros(30)}
    merged = merge_state_dicts([vector], method, 1.0, {"density": 0.2, "trim": "global"})
    # Reference: top-k of the image encoder alone, k = floor(0.2 * 10) = 2.
    order = sorted(range(10), key=lambda i: -abs(float(image[i])))
    expected = torch.zeros(10)
    for i in order[:2]:
        expected[i] = image[i]
    torch.testing.assert_close(merged["visual.proj"], expected)
    assert int((merged["visual.proj"] != 0).sum()) == 2
    # The other tensors are ranked among themselves, to the same density.
    text = torch.randn(30, generator=gen)
    merged = merge_state_dicts([{"visual.proj": 100 * image, "transformer.w": text}], method,
                               1.0, {"density": 0.2, "trim": "global"})
    assert int((merged["transformer.w"] != 0).sum()) == 6
    assert int((merged["visual.proj"] != 0).sum()) == 2


def test_default_search_grids_fit_each_method():
    from tvtool.grid import parse_grid
    from tvtool.workflows.merge_search import default_grid_text

    ties = parse_grid(default_grid_text("ties"))
    # The TIES reference searches λ over 0.8, 0.9, ..., 2.5.
    assert ties == tuple(round(0.8 + 0.1 * i, 10) for i in range(18))
    assert parse_grid(default_grid_text("dare", {"combine": "ties"})) == ties
    for method, params in (("task_arithmetic", {}), ("dare", {"combine": "sum"}),
                           ("magnitude", {}), ("mean", {})):
        grid = parse_grid(default_grid_text(method, params))
        assert grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 21


@pytest.mark.parametrize("method", ["ties", "magnitude", "dare"])
def test_density_zero_gives_zero(method):
    vectors = [{"w": torch.randn(6)}, {"w": torch.randn(6)}]
    merged = merge_state_dicts(vectors, method, 1.0, {"density": 0.0})
    assert not merged["w"].any()


def test_inputs_are_not_modified():
    vectors = [{"w": torch.randn(50)}, {"w": torch.randn(50)}]
    copies = [{k: t.clone() for k, t in v.items()} for v in vectors]
    for method in METHODS:
        merge_state_dicts(vectors, method, 0.7, {"density": 0.3} if method in (
            "ties", "dare", "magnitude") else None)
    for v, c in zip(vectors, copies, strict=True):
        torch.testing.assert_close(v["w"], c["w"], rtol=0, atol=0)


def test_dtypes_are_kept_and_promoted():
    half = {"w": torch.randn(8).half()}
    merged = merge_state_dicts([half, half], "mean")
    assert merged["w"].dtype == torch.float16
    mixed = merge_state_dicts([half, {"w": torch.randn(8)}], "task_arithmetic")
    assert mixed["w"].dtype == torch.float32


# ---------------------------------------------------------------- exact thresholds


@FAST
@given(st.integers(0, 10_000), st.sampled_from([torch.float32, torch.float16, torch.bfloat16,
                                                torch.float64]),
       st.floats(0.0, 1.0), st.booleans())
def test_radix_threshold_equals_kthvalue(seed, dtype, density, with_ties):
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, generator=gen).to(dtype) for n in (13, 1, 40, 7)]
    if with_ties:
        parts.append(torch.tensor([0.5, -0.5, 0.5, 0.0, -0.0], dtype=dtype))
    flat = torch.cat([p.reshape(-1) for p in parts])
    k = int(density * flat.numel())
    wide = dtype == torch.float64
    ours = kth_largest_magnitude(lambda: iter(parts), k, wide=wide)
    if k == 0:
        assert ours == math.inf
        return
    compare = flat.to(torch.float64 if wide else torch.float32).abs()
    expected = float(torch.kthvalue(compare, flat.numel() - k + 1).values)
    assert ours == expected


def test_radix_threshold_across_chunks(monkeypatch):
    monkeypatch.setattr(merge_base, "CHUNK_ELEMENTS", 7)
    monkeypatch.setattr("tvtool.merge.trim.chunk_starts",
                        lambda n, chunk=None: merge_base.chunk_starts(n, 7))
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(30, generator=gen), torch.randn(4, 5, generator=gen)]
    flat = torch.cat([p.reshape(-1) for p in parts]).abs()
    for k in (1, 5, 25, 50):
        assert kth_largest_magnitude(lambda: iter(parts), k) == float(
            torch.kthvalue(flat, flat.numel() - k + 1).values)


@FAST
@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_per_tensor_threshold_equals_kthvalue(seed, density):
    from tvtool.merge.trim import keep_count, kth_largest_abs

    tensor = torch.randn(37, 5, generator=torch.Generator().manual_seed(seed))
    expected = (None if density >= 1.0
                else kth_largest_abs(tensor, keep_count(tensor.numel(), density)))
    assert tensor_threshold(tensor, density) == expected


def test_per_tensor_threshold_edge_cases():
    t = torch.tensor([3.0, -1.0, 2.0])
    assert tensor_threshold(t, 1.0) is None
    assert tensor_threshold(t, 0.0) == math.inf
    assert tensor_threshold(t, 0.34) == 3.0
    assert tensor_threshold(t, 0.67) == 2.0


# ---------------------------------------------------------------- DARE


def _pair(seed=0, n=3000):
    gen = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(n, generator=gen), "v": torch.randn(7, 9, generator=gen)}
            for _ in range(2)]


def test_dare_is_deterministic_with_a_seed_and_changes_with_it():
    vectors = _pair()
    first = merge_state_dicts(vectors, "dare", 1.0, {"density": 0.3}, seed=5)
    again = merge_state_dicts(vectors, "dare", 1.0, {"density": 0.3}, seed=5)
    other = merge_state_dicts(vectors, "dare", 1.0, {"density": 0.3}, seed=6)
    close(first, again, atol=0)
    assert not torch.equal(first["w"], other["w"])


def test_dare_does_not_touch_the_global_rng():
    state = torch.random.get_rng_state()
    merge_state_dicts(_pair(), "dare", 1.0, {"density": 0.5}, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())


def test_dare_masks_do_not_depend_on_chunking_or_tensor_order(monkeypatch):
    vectors = _pair(n=5000)
    reference = merge_state_dicts(vectors, "dare", 1.0, {"density": 0.4}, seed=2)
    reordered = [dict(reversed(list(v.items()))) for v in vectors]
    close(merge_state_dicts(reordered, "dare", 1.0, {"density": 0.4}, seed=2), reference, atol=0)
    monkeypatch.setattr(merge_base, "CHUNK_ELEMENTS", 333)
    close(merge_state_dicts(vectors, "dare", 1.0, {"density": 0.4}, seed=2), reference, atol=0)


def test_dare_keeps_about_density_and_rescales():
    vector = {"w": torch.ones(200_000)}
    merged = merge_state_dicts([vector], "dare", 1.0, {"density": 0.25}, seed=0)["w"]
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(merged[kept], torch.full_like(merged[kept], 4.0))
    plain = merge_state_dicts([vector], "dare", 1.0, {"density": 0.25, "rescale": False})["w"]
    assert set(plain.unique().tolist()) == {0.0, 1.0}


def test_dare_at_density_1_is_task_arithmetic_and_ties_combine_runs():
    vectors = _pair()
    close(merge_state_dicts(vectors, "dare", 0.4, {"density": 1.0}),
          merge_state_dicts(vectors, "task_arithmetic", 0.4), atol=1e-6)
    merged = merge_state_dicts(vectors, "dare", 1.0, {"density": 0.5, "combine": "ties"}, seed=3)
    assert merged["w"].shape == (3000,)


# ---------------------------------------------------------------- chunking and key sets


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3, "trim": "tensor"}),
                                           ("magnitude", {"density": 0.3}),
                                           ("task_arithmetic", None), ("mean", None)])
def test_chunking_does_not_change_results(monkeypatch, method, params):
    vectors = _pair(n=1000)
    reference = merge_state_dicts(vectors, method, [0.4, 0.9], params)
    monkeypatch.setattr(merge_base, "CHUNK_ELEMENTS", 37)
    close(merge_state_dicts(vectors, method, [0.4, 0.9], params), reference, atol=0)


def test_key_set_policies():
    a = {"x": torch.ones(3), "y": torch.ones(2)}
    b = {"x": torch.ones(3) * 2}
    with pytest.raises(InvalidInputError, match="different tensors"):
        merge_state_dicts([a, b])
    union = merge_state_dicts([a, b], "mean", missing="zero")
    torch.testing.assert_close(union["x"], torch.full((3,), 1.5))
    torch.testing.assert_close(union["y"], torch.full((2,), 0.5))
    common = merge_state_dicts([a, b], missing="common")
    assert list(common) == ["x"]


def test_shape_mismatch_is_refused():
    with pytest.raises(InvalidInputError, match="shape"):
        merge_state_dicts([{"x": torch.ones(3)}, {"x": torch.ones(4)}], missing="zero")


def test_per_tensor_coefficients():
    a, b = {"x": torch.ones(2), "y": torch.ones(2)}, {"x": torch.ones(2), "y": torch.ones(2)}
    merged = merge_state_dicts([a, b], per_tensor_coefs={"x": [1.0, 2.0], "y": [0.0, -1.0]})
    torch.testing.assert_close(merged["x"], torch.full((2,), 3.0))
    torch.testing.assert_close(merged["y"], torch.full((2,), -1.0))
    with pytest.raises(InvalidInputError, match="no coefficient"):
        merge_state_dicts([a, b], per_tensor_coefs={"x": [1.0, 2.0]})


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", None), ("mean", None), ("magnitude", {"density": 0.4, "trim": "tensor"}),
    ("dare", {"density": 0.4}), ("dare", {"density": 0.4, "combine": "ties"}),
    ("ties", {"density": 0.4, "trim": "tensor"})])
def test_list_functions_equal_the_streaming_engine(method, params):
    from tvtool.merge.method import TensorContext

    vectors = _pair(n=500)
    weights = [0.7, -0.2]
    entry = get_method(method)
    parsed = entry.make_params(params or {})
    streamed = merge_state_dicts(vectors, method, weights, params, seed=4)
    for name in vectors[0]:
        listed = entry.fn([v[name] for v in vectors], weights, parsed,
                          TensorContext(name=name, seed=4))
        torch.testing.assert_close(listed, streamed[name], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- per-vector parameters


def test_which_methods_take_per_vector_parameters():
    from tvtool.merge import METHODS

    # Only the density of the trimming/dropping methods differs per vector (mergekit's
    # per-model density); the coefficient is per vector everywhere.
    expected = {"task_arithmetic": (), "mean": (), "ties": ("density",),
                "dare": ("density",), "magnitude": ("density",)}
    assert {name: METHODS[name].per_vector for name in expected} == expected
    for method in METHODS.values():  # methods registered later declare their own
        assert set(method.per_vector) <= {f.name for f in dataclasses.fields(method.params)}


def test_per_vector_parameters_a_method_lacks_are_refused():
    from tvtool.errors import UsageError
    from tvtool.merge import merge_state_dicts

    vectors = [{"w": torch.ones(4)}, {"w": torch.ones(4)}]
    with pytest.raises(UsageError, match=r"vectors\[1\]: method 'task_arithmetic' takes no "
                                         r"per-vector \['density'\]"):
        merge_state_dicts(vectors, "task_arithmetic", vector_params=[{}, {"density": 0.5}])
    with pytest.raises(UsageError, match=r"vectors\[0\]: method 'ties' takes no per-vector "
                                         r"\['trim'\]"):
        merge_state_dicts(vectors, "ties", vector_params=[{"trim": "tensor"}, {}])
    with pytest.raises(UsageError, match=r"vectors\[0\]: method 'dare': density"):
        merge_state_dicts(vectors, "dare", vector_params=[{"density": 1.5}, {}])


def test_dare_per_vector_density_is_each_vector_dropped_at_its_own_rate():
    from tvtool.merge import merge_state_dicts

    gen = torch.Generator().manual_seed(0)
    a, b = ({"w": torch.randn(4000, generator=gen)} for _ in range(2))
    zero = {"w": torch.zeros(4000)}
    for combine in ("sum", "ties"):
        params = {"combine": combine, "rescale": True}
        both = merge_state_dicts([a, b], "dare", 1.0, params, seed=3,
                                 vector_params=[{"density": 0.2}, {"density": 0.7}])
        if combine == "sum":
            # Separable: the sum of each vector merged alone at its own density (same
            # positions, so the same seeded masks).
            alone = [merge_state_dicts(v, "dare", 1.0, {**params, "density": d}, seed=3)["w"]
                     for v, d in (([a, zero], 0.2), ([zero, b], 0.7))]
            torch.testing.assert_close(both["w"], alone[0] + alone[1])
        # Each vector alone (the other zero) keeps about its density, rescaled by 1/density.
        for vectors, density, source in (([a, zero], 0.2, a), ([zero, b], 0.7, b)):
            alone = merge_state_dicts(vectors, "dare", 1.0, params, seed=3,
                                      vector_params=[{"density": 0.2}, {"density": 0.7}])["w"]
            kept = alone != 0
            assert abs(kept.float().mean().item() - density) < 0.03
            torch.testing.assert_close(alone[kept], source["w"][kept] / density)
