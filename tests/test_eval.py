"""Library tests of tvtool.evaluate: accuracy, edits, linearized vectors, heads, references."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY, load
from tvtool.commands.apply import ApplyConfig
from tvtool.commands.apply import apply as run_apply
from tvtool.errors import InvalidInputError, UsageError
from tvtool.evaluate import (
    EvalConfig,
    EvalSettings,
    clear_memory_cache,
    evaluate,
    head_key,
    load_references,
    open_eval_data,
    open_eval_model,
    read_head_file,
    references_from_document,
    zero_shot_head,
)
from tvtool.io import write_json, write_tensors
from tvtool.metadata import FileMeta, Kind, Mode

DATASET = "synthetic:shape"


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """A fresh head cache per test (never the user's)."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("TVTOOL_CACHE_DIR", str(root))
    clear_memory_cache()
    yield root
    clear_memory_cache()


@pytest.fixture(scope="module")
def linear_vectors(files, tmp_path_factory):
    """tv1 and tv2 re-labelled as linearized (mode linear) vectors."""
    root = tmp_path_factory.mktemp("linear")
    out = {}
    for index in (1, 2):
        tensors = load(files[f"tv{index}"])
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY, mode=Mode.LINEAR,
                        linearized=True, dataset=f"task{index}")
        path = root / f"lin{index}.safetensors"
        write_tensors(str(path), tensors, meta.to_header())
        out[index] = str(path)
    return out


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _independent_correct(base: str, dataset: str, limit: int, seed: int = 0) -> int:
    """Correct predictions recomputed without tvtool.evaluate: the model, the split, the
    seeded subset, CLIP's prompt ensemble and argmax written out here."""
    from tvtool.data import load_split, task_spec
    from tvtool.models import load_clip

    bundle = load_clip(base)
    model = bundle.model.eval()
    split = load_split(dataset, "test", bundle.preprocess_eval, seed=seed)
    chosen = sorted(torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
                    [:limit].tolist())
    spec = task_spec(dataset)
    with torch.no_grad():
        rows = []
        for name in spec.classnames:
            texts = bundle.tokenizer([t.format(name) for t in spec.templates])
            unit = F.normalize(model.encode_text(texts).float(), dim=-1)
            rows.append(F.normalize(unit.mean(0), dim=0))
        head = torch.stack(rows)
        images = torch.stack([split[i][0] for i in chosen])
        labels = torch.tensor([split[i][1] for i in chosen])
        features = F.normalize(model.encode_image(images).float(), dim=-1)
        return int(((features @ head.T).argmax(-1) == labels).sum())


def test_base_accuracy_on_synthetic_task(files):
    report = evaluate(EvalConfig(EvalSettings(base=files["base"], limit=48, device="cpu"),
                                 datasets=(DATASET,)))
    (result,) = report.results
    assert result.dataset == DATASET and result.split == "test"
    assert result.total == 48 and result.num_classes == 6
    assert result.correct == _independent_correct(files["base"], DATASET, 48)
    assert result.accuracy == result.correct / 48
    doc = report.as_json()
    json.dumps(doc)  # JSON-ready
    assert doc["model"]["evaluated_as"] == "weights" and doc["model"]["vectors"] == []
    split = doc["splits"][0]
    assert split["manifest"]["dataset"] == DATASET and split["examples"] == 48
    assert split["subset"]["indices_sha256"].startswith("sha256:")


def test_vector_evaluation_matches_applied_checkpoint(files, tmp_path):
    applied = tmp_path / "applied.safetensors"
    run_apply(ApplyConfig(base=files["base"], vectors=(files["tv1"],),
                                            output=str(applied), coefs=(0.7,)))
    x = _images()
    with open_eval_model(files["base"], [files["tv1"]]) as model:
        model.set_coefficients([0.7])
        edited = model.image_features(x)
        model.set_coefficients([0.0])
        base = model.image_features(x)
    with open_eval_model(str(applied)) as reference:
        expected = reference.image_features(x)
    with open_eval_model(files["base"]) as plain:
        expected_base = plain.image_features(x)
    torch.testing.assert_close(edited, expected, rtol=0, atol=0)
    torch.testing.assert_close(base, expected_base, rtol=0, atol=0)
    assert not torch.equal(edited, base)


def test_eval_report_of_vectors_equals_report_of_checkpoint(files, tmp_path):
    applied = tmp_path / "applied.safetensors"
    run_apply(ApplyConfig(base=files["base"], vectors=(files["tv1"],
                                            files["tv2"]), output=str(applied), coefs=(0.5,)))
    common = {"datasets": (DATASET, "synthetic:color")}
    via_vectors = evaluate(EvalConfig(EvalSettings(base=files["base"], limit=40, device="cpu"),
                                      vectors=(files["tv1"], files["tv2"]), coefs=(0.5,),
                                      **common))
    via_checkpoint = evaluate(EvalConfig(EvalSettings(base=str(applied), limit=40,
                                                      device="cpu"), **common))
    assert [r.correct for r in via_vectors.results] == [r.correct for r in via_checkpoint.results]
    assert [v["coef"] for v in via_vectors.model["vectors"]] == [0.5, 0.5]


def test_explicit_weights_and_builder(files):
    x = _images()
    base_state = load(files["base"])
    tv = load(files["tv1"])
    edited = {name: base_state[name] + 0.3 * tv[name] for name in tv}
    with open_eval_model(files["base"], [files["tv1"]]) as model:
        model.set_coefficients([0.3])
        by_coef = model.image_features(x)
        model.set_weights(edited)
        by_state = model.image_features(x)
        def builder(base, vectors):
            names = vectors[0].source.keys()
            return {n: base.get(n) + 0.3 * vectors[0].source.get(n) for n in names}

        model.set_weights(builder)
        by_builder = model.image_features(x)
        with pytest.raises(InvalidInputError, match="not in the base"):
            model.set_weights({"nope": torch.zeros(1)})
    torch.testing.assert_close(by_state, by_coef, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_builder, by_coef, rtol=0, atol=1e-6)


def test_linearized_vectors_use_the_linearized_model(files, linear_vectors):
    from tvtool.linearize import jvp_reference
    from tvtool.models import load_clip

    x = _images()
    with open_eval_model(files["base"], [linear_vectors[1], linear_vectors[2]]) as model:
        assert model.linearized
        model.set_coefficients([0.8, -0.4])
        linear = model.image_features(x)
    bundle = load_clip(files["base"])
    v1, v2 = load(files["tv1"]), load(files["tv2"])
    delta = {n[len("visual."):]: 0.8 * v1[n] - 0.4 * v2[n] for n in v1}
    expected = F.normalize(jvp_reference(bundle.model.visual, None, delta, x), dim=-1)
    torch.testing.assert_close(linear, expected, rtol=1e-4, atol=1e-5)
    # The weight-space model differs (second-order terms): linearized is not silently ignored.
    with open_eval_model(files["base"], [files["tv1"], files["tv2"]]) as plain:
        plain.set_coefficients([0.8, -0.4])
        assert (plain.image_features(x) - linear).abs().max() > 1e-6


def test_linearized_explicit_weights_are_offsets_from_base(files, linear_vectors):
    x = _images()
    base_state = load(files["base"])
    tv = load(files["tv1"])
    with open_eval_model(files["base"], [linear_vectors[1]]) as model:
        model.set_coefficients([1.5])
        by_coef = model.image_features(x)
        model.set_weights({n: base_state[n] + 1.5 * tv[n] for n in tv})
        by_state = model.image_features(x)
    torch.testing.assert_close(by_state, by_coef, rtol=1e-4, atol=1e-5)


def test_mixing_linearized_and_plain_vectors_is_refused(files, linear_vectors):
    with pytest.raises(InvalidInputError, match="linearized"):
        open_eval_model(files["base"], [linear_vectors[1], files["tv2"]])
    with open_eval_model(files["base"], [linear_vectors[1], files["tv2"]],
                         approximate_linearized=True) as model:
        assert not model.linearized
        assert any("approximates" in note for note in model.notes)


def test_vector_from_another_base_is_refused(files, tiny_state, tmp_path):
    other = {k: v + 1.0 if v.is_floating_point() else v for k, v in tiny_state.items()}
    path = tmp_path / "other.safetensors"
    write_tensors(str(path), other, FileMeta(kind=Kind.CHECKPOINT, architecture=TINY).to_header())
    with pytest.raises(InvalidInputError, match="another base"):
        open_eval_model(str(path), [files["tv1"]])
    with open_eval_model(str(path), [files["tv1"]], allow_base_mismatch=True):
        pass


def test_zero_shot_head_cache_memory_and_disk(files, cache):
    from tvtool.evaluate.head_cache import heads_dir

    with open_eval_model(files["base"]) as model:
        key = head_key(model.base_fingerprint, "demo", ["circle", "square"], ["a {}."])
        first = zero_shot_head(model.bundle, key, ["a {}."])
        (stored,) = list(heads_dir().iterdir())
        assert stored.parent == cache / "heads"
        assert zero_shot_head(model.bundle, key, ["a {}."]) is first  # memory
        clear_memory_cache()
        from_disk = zero_shot_head(model.bundle, key, ["a {}."])
        torch.testing.assert_close(from_disk, first, rtol=0, atol=0)
        assert read_head_file(str(stored), num_classes=2).shape == first.shape
        # A damaged cache entry is rebuilt, with a note, never trusted.
        stored.write_bytes(b"garbage")
        clear_memory_cache()
        notes: list[str] = []
        rebuilt = zero_shot_head(model.bundle, key, ["a {}."], log=notes.append)
        torch.testing.assert_close(rebuilt, first, rtol=0, atol=0)
        assert notes and "ignoring cached head" in notes[0]
        other = head_key(model.base_fingerprint, "demo", ["circle", "square"], ["a {} shape."])
        assert other.digest != key.digest


def test_head_file_with_wrong_class_count_is_refused(files, tmp_path):
    with open_eval_model(files["base"]) as model:
        key = head_key(model.base_fingerprint, "three", ["a", "b", "c"], ["{}"])
        head = zero_shot_head(model.bundle, key, ["{}"], disk_cache=False)
    from tvtool.evaluate import head_metadata

    path = tmp_path / "head.safetensors"
    write_tensors(str(path), {"head": head}, head_metadata(key))
    with pytest.raises(InvalidInputError, match="scores 3 classes, the dataset has 6"):
        evaluate(EvalConfig(EvalSettings(base=files["base"], limit=8, device="cpu"),
                            datasets=(DATASET,), heads=(str(path),)))


def test_references_and_normalized_accuracy(files, tmp_path):
    finetuned = evaluate(EvalConfig(EvalSettings(base=files["base"], limit=40, device="cpu"),
                                    vectors=(files["tv1"],),
                                    datasets=(DATASET, "synthetic:color")))
    doc = finetuned.as_json()
    # A single-vector report whose vector records no matching dataset: every entry is taken.
    refs = references_from_document(doc, "ft")
    assert set(refs) == {DATASET, "synthetic:color"}
    # When the vector records its dataset, only that dataset is the fine-tuned reference.
    doc["model"]["vectors"][0]["dataset"] = DATASET
    assert set(references_from_document(doc, "ft")) == {DATASET}
    path = tmp_path / "ref.json"
    write_json(str(path), {DATASET: 0.5, "synthetic:color": {"accuracy": 0.25,
                                                               "num_classes": 8}})
    report = evaluate(EvalConfig(EvalSettings(base=files["base"], limit=40, device="cpu"),
                                 datasets=(DATASET, "synthetic:color"),
                                 references=(str(path),)))
    for result, ref in zip(report.results, (0.5, 0.25), strict=True):
        assert result.reference_accuracy == ref
        assert result.normalized_accuracy == pytest.approx(result.accuracy / ref)
    assert report.average_normalized_accuracy == pytest.approx(
        sum(r.normalized_accuracy for r in report.results) / 2)


@pytest.mark.parametrize("document, message", [
    ({"synthetic:shape": 93.0}, "outside"),
    ({"synthetic:shape": 0}, "outside"),
    ({"synthetic:shape": "high"}, "must be a number"),
    ([], "empty list"),
    ({"results": []}, "no results"),
    ([{"a": 0.5}, {"a": 0.6}], "two reference accuracies"),
])
def test_malformed_references_are_refused(document, message):
    with pytest.raises(InvalidInputError, match=message):
        references_from_document(document, "ref")


def test_reference_class_count_mismatch_is_refused(files, tmp_path):
    path = tmp_path / "ref.json"
    write_json(str(path), {DATASET: {"accuracy": 0.9, "num_classes": 10}})
    assert load_references([str(path)])[DATASET].num_classes == 10
    with pytest.raises(InvalidInputError, match="10 classes, the dataset has 6"):
        evaluate(EvalConfig(EvalSettings(base=files["base"], limit=8, device="cpu"),
                            datasets=(DATASET,), references=(str(path),)))


@pytest.mark.parametrize("settings, changes, error", [
    ({}, {"datasets": ()}, UsageError),
    ({"batch_size": 0}, {}, UsageError),
    ({"workers": -1}, {}, UsageError),
    ({"limit": 0}, {}, UsageError),
    ({}, {"split": "holdout"}, UsageError),
    ({"precision": "fp8"}, {}, UsageError),
    ({"device": "tpu"}, {}, UsageError),
    ({}, {"coefs": (1.0, 2.0, 3.0), "vectors": ("a", "b")}, UsageError),
    ({}, {"heads": ("a", "b")}, UsageError),
    ({}, {"datasets": ("synthetic:nope",)}, InvalidInputError),
])
def test_bad_settings(files, settings, changes, error):
    with pytest.raises(error):
        evaluate(EvalConfig(EvalSettings(**{"base": files["base"], "device": "cpu",
                                            "limit": 8, **settings}),
                            **{"datasets": (DATASET,), **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 0}, "--batch-size must be positive"),
    ({"workers": -1}, "--workers must be >= 0"),
    ({"precision": "fp8"}, "fp8"),
])
def test_settings_are_checked_on_construction(changes, message):
    # Every evaluating command (eval, disentanglement, the searches) holds these settings, so
    # a bad value is refused before any model or dataset is opened.
    with pytest.raises(UsageError, match=message):
        EvalSettings(base="unused", **changes)


def test_report_settings_keep_their_order():
    config = EvalConfig(EvalSettings(base="b", limit=4), datasets=("d",), vectors=("v",),
                        weights={})
    assert list(config.arguments()) == [
        "base", "datasets", "vectors", "coefs", "split", "data_root", "batch_size", "device",
        "precision", "limit", "seed", "workers", "references", "heads", "allow_base_mismatch",
        "approximate_linearized", "cache_heads", "weights"]
    assert config.arguments()["datasets"] == ["d"]
    assert config.arguments()["limit"] == 4
    assert config.arguments()["weights"] == "state dict"


def test_limit_subset_is_seeded_and_sorted():
    from tvtool.models import load_clip

    transform = load_clip(f"{TINY}:random").preprocess_eval
    a = open_eval_data(DATASET, "test", transform, limit=30, seed=3)
    b = open_eval_data(DATASET, "test", transform, limit=30, seed=3)
    c = open_eval_data(DATASET, "test", transform, limit=30, seed=4)
    assert a.indices == b.indices == sorted(a.indices) and a.indices != c.indices
    assert a.size == 30 and a.total == 1000


@pytest.mark.parametrize(("mode", "linearized"), [
    (Mode.LORA, False), (Mode.LLORA, False), (Mode.LLORA_NET, True),
    (Mode.LLORA, True),  # written by an older tvtool: read as llora-net
])
def test_lora_vectors_are_materialized(files, tmp_path, mode, linearized):
    from tvtool.linearize import linearized_forward
    from tvtool.models import load_clip

    target = "visual.transformer.resblocks.0.attn.out_proj.weight"
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 64, generator=gen), 0.05 * torch.randn(64, 2, generator=gen)
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY, mode=mode,
                    linearized=linearized, extra={"lora_alpha": "4.0", "lora_rank": "2"})
    path = tmp_path / "lora.safetensors"
    write_tensors(str(path), {f"{target}.lora_A": a, f"{target}.lora_B": b}, meta.to_header())
    dense = (b.double() @ a.double() * 2.0).float()
    x = _images()
    with open_eval_model(files["base"], [str(path)]) as model:
        assert model.linearized is linearized
        model.set_coefficients([1.0])
        features = model.image_features(x)
    bundle = load_clip(files["base"])
    if linearized:
        local = target[len("visual."):]
        expected = linearized_forward(bundle.model.visual, None, {local: dense}, x)
    else:
        with torch.no_grad():
            bundle.model.state_dict()[target].add_(dense)
        expected = bundle.model.encode_image(x)
    torch.testing.assert_close(features, F.normalize(expected, dim=-1), rtol=1e-4, atol=1e-5)
