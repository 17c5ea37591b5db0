"""tvtool.models: model references, loading, fingerprints, architecture matching."""

from __future__ import annotations

import weakref

import open_clip
import pytest
import torch

from tests.conftest import TINY
from tvtool.errors import InvalidInputError
from tvtool.io import DictSource, write_tensors
from tvtool.metadata import FileMeta, Kind
from tvtool.models import (
    ModelRef,
    RefKind,
    architecture_shapes,
    base_source,
    fingerprint,
    load_clip,
    match_architecture,
    parse_ref,
    resolve_ref,
    state_dict_fingerprint,
)
from tvtool.models import refs as refs_module

# ---------------------------------------------------------------- parse_ref


def test_embedded_and_random_refs():
    embedded = parse_ref(TINY)
    assert embedded.kind is RefKind.EMBEDDED and embedded.architecture == TINY
    assert embedded.is_file
    random = parse_ref(f"  {TINY}:random ")
    assert random == ModelRef(f"{TINY}:random", RefKind.RANDOM, TINY)
    assert not random.is_file


def test_both_embedded_models_resolve_to_their_own_packaged_file():
    small = parse_ref("tvtool-small")
    assert small.kind is RefKind.EMBEDDED and small.architecture == "tvtool-small"
    assert small.location is not None and small.location.endswith("tvtool-small.safetensors")
    assert parse_ref(TINY).location != small.location
    with pytest.raises(InvalidInputError, match="not an embedded model"):
        refs_module.embedded_weights_path("ViT-B-32")


def test_the_base_model_is_embedded_but_not_packaged(tmp_path, monkeypatch):
    from tvtool.models import BASE_MODEL, PACKAGED_MODELS, architecture_shapes

    monkeypatch.setenv("TVTOOL_CACHE_DIR", str(tmp_path))
    assert BASE_MODEL not in PACKAGED_MODELS
    base = parse_ref(BASE_MODEL)
    assert base.kind is RefKind.EMBEDDED
    assert base.location == str(tmp_path / "tvtool-base.safetensors")
    # width 256: twice tvtool-small's image encoder, the same text tower
    shapes, small = architecture_shapes(BASE_MODEL), architecture_shapes("tvtool-small")
    assert shapes["visual.conv1.weight"][0] == 2 * small["visual.conv1.weight"][0] == 256
    assert shapes["token_embedding.weight"] == small["token_embedding.weight"]


def test_pretrained_tags_pick_the_matching_activation():
    openai = parse_ref("ViT-B-32:openai")
    assert openai.kind is RefKind.PRETRAINED_TAG
    assert openai.architecture == "ViT-B-32-quickgelu" and openai.location == "openai"
    laion = parse_ref("ViT-B-32:laion2b_s34b_b79k")
    assert laion.architecture == "ViT-B-32"
    assert parse_ref("ViT-B-32-quickgelu:openai").architecture == "ViT-B-32-quickgelu"


def test_file_refs(tmp_path, monkeypatch):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    ref = parse_ref(f"ViT-B-32:{weights}")
    assert ref.kind is RefKind.WEIGHTS_FILE and ref.location == str(weights)
    assert ref.architecture == "ViT-B-32"
    checkpoint = tmp_path / "c.safetensors"
    checkpoint.write_bytes(b"x")
    assert parse_ref(str(checkpoint)).kind is RefKind.CHECKPOINT
    monkeypatch.chdir(tmp_path)
    assert parse_ref("c.safetensors").kind is RefKind.CHECKPOINT
    assert parse_ref(f"{TINY}:c.safetensors").kind is RefKind.WEIGHTS_FILE


def test_hf_hub_ref():
    ref = parse_ref("hf-hub:org/repo")
    assert ref.kind is RefKind.HF_HUB and ref.location == "org/repo"


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty model reference"),
    ("hf-hub:", "empty hf-hub"),
    ("NoSuchModel", "unknown model 'NoSuchModel'"),
    ("NoSuchModel:openai", "unknown model"),
    ("ViT-B-32", "names no weights"),
    ("ViT-B-32:", "names no weights"),
    ("ViT-B-32:notatag", "unknown pretrained tag 'notatag'"),
    ("ViT-B-32:/no/such/file.pt", "does not exist"),
    ("/no/such/model.safetensors", "not an existing file"),
    ("missing.pt", "not an existing file"),
])
def test_bad_refs(text, message):
    with pytest.raises(InvalidInputError, match=message):
        parse_ref(text)


@pytest.mark.parametrize(("text", "suggestion", "fixed"), [
    ("tvtool-tinny", "'tvtool-tiny'", "tvtool-tiny"),
    ("tvtool-smal", "'tvtool-small'", "tvtool-small"),
    ("vit-b-32:openai", "'ViT-B-32'", "ViT-B-32:openai"),  # a case slip: that one name
    ("ViT-B-32:opneai", "'openai'", "ViT-B-32:openai"),    # a tag's typo
    ("ViT-B-32:OpenAI", "'openai'", "ViT-B-32:openai"),
])
def test_unknown_names_get_a_suggestion(text, suggestion, fixed):
    with pytest.raises(InvalidInputError) as caught:
        parse_ref(text)
    assert (caught.value.hint or "").startswith(f"did you mean {suggestion}? ")
    parse_ref(fixed)  # the suggestion, taken, parses


def test_a_name_near_nothing_gets_no_suggestion():
    with pytest.raises(InvalidInputError) as caught:
        parse_ref("Qwertyuiop")
    assert "did you mean" not in (caught.value.hint or "")


def test_pickled_file_as_ref_needs_an_architecture(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="without an architecture") as info:
        parse_ref(str(path))
    assert "NAME:PATH" in info.value.one_line()


# ---------------------------------------------------------------- resolving and loading


def _write(path, tensors, **meta):
    write_tensors(str(path), tensors, FileMeta(**meta).to_header() if meta else {})
    return str(path)


def test_resolve_checkpoint_reads_its_architecture(tmp_path, tiny_state):
    path = _write(tmp_path / "c.safetensors", tiny_state, kind=Kind.CHECKPOINT, architecture=TINY)
    assert resolve_ref(path).architecture == TINY
    vector = _write(tmp_path / "v.safetensors", {"x": torch.ones(1)}, kind=Kind.TASK_VECTOR)
    with pytest.raises(InvalidInputError, match="not a checkpoint"):
        resolve_ref(vector)
    nameless = _write(tmp_path / "n.safetensors", {"x": torch.ones(1)}, kind=Kind.CHECKPOINT)
    with pytest.raises(InvalidInputError, match="does not name its architecture"):
        resolve_ref(nameless)
    plain = _write(tmp_path / "p.safetensors", {"x": torch.ones(1)})
    with pytest.raises(InvalidInputError, match="no tvtool metadata"):
        resolve_ref(plain)


def test_weights_file_with_wrapper_prefix(tmp_path, tiny_state):
    path = tmp_path / "w.safetensors"
    _write(path, {f"module.{k}": v for k, v in tiny_state.items()})
    source, ref = base_source(f"{TINY}:{path}")
    try:
        assert ref.kind is RefKind.WEIGHTS_FILE
        assert set(source.keys()) == set(tiny_state)
        assert torch.equal(source.get("visual.proj"), tiny_state["visual.proj"])
    finally:
        source.close()
    bundle = load_clip(f"{TINY}:{path}")
    assert torch.equal(bundle.model.state_dict()["visual.proj"], tiny_state["visual.proj"])


def test_pickled_weights_file_is_read_safely(tmp_path, tiny_state):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tiny_state.items()}}, path)
    bundle = load_clip(f"{TINY}:{path}")
    assert torch.equal(bundle.model.state_dict()["visual.proj"], tiny_state["visual.proj"])


def test_vector_as_weights_file_is_refused(tmp_path):
    path = _write(tmp_path / "v.safetensors", {"x": torch.ones(1)}, kind=Kind.TASK_VECTOR)
    with pytest.raises(InvalidInputError, match="not model weights"):
        base_source(f"{TINY}:{path}")


def test_weights_that_do_not_fit_are_reported(tmp_path, tiny_state):
    partial = {k: v for k, v in tiny_state.items() if k != "visual.proj"}
    partial["extra.weight"] = torch.ones(1)
    path = _write(tmp_path / "w.safetensors", partial)
    with pytest.raises(InvalidInputError, match=r"1 missing keys \['visual.proj'\], 1 unexpected"):
        load_clip(f"{TINY}:{path}")
    wrong = dict(tiny_state, **{"visual.proj": torch.ones(3)})
    path = _write(tmp_path / "s.safetensors", wrong)
    with pytest.raises(InvalidInputError, match=r"visual\.proj' has shape"):
        load_clip(f"{TINY}:{path}")


def test_missing_embedded_weights_point_to_pretrain(tmp_path, monkeypatch):
    monkeypatch.setattr(refs_module, "embedded_weights_path",
                        lambda name=TINY: tmp_path / "none")
    with pytest.raises(InvalidInputError, match="embedded tvtool-tiny weights") as info:
        base_source(TINY)
    assert "tvtool pretrain --model tvtool-tiny" in info.value.one_line()


def test_random_refs_are_deterministic():
    a = load_clip(f"{TINY}:random").model.state_dict()
    b, _ = base_source(f"{TINY}:random")
    assert all(torch.equal(a[k], b.get(k)) for k in a)


def test_hub_and_tag_refs_call_open_clip_correctly(monkeypatch):
    calls = []

    def fake_create(name, pretrained=None):
        calls.append((name, pretrained))
        return torch.nn.Linear(1, 1), None, None

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    base_source("hf-hub:org/repo")
    base_source("ViT-B-32:openai")
    assert calls == [("hf-hub:org/repo", None), ("ViT-B-32-quickgelu", "openai")]


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_properties(tmp_path, tiny_state):
    first = state_dict_fingerprint(tiny_state)
    assert first.startswith("sha256:") and len(first) == 7 + 64
    reordered = dict(reversed(list(tiny_state.items())))
    assert state_dict_fingerprint(reordered) == first
    changed = dict(tiny_state, **{"visual.proj": tiny_state["visual.proj"] + 1e-7})
    assert state_dict_fingerprint(changed) != first
    renamed = {("x" + k if k == "visual.proj" else k): v for k, v in tiny_state.items()}
    assert state_dict_fingerprint(renamed) != first
    path = _write(tmp_path / "c.safetensors", tiny_state, kind=Kind.CHECKPOINT, architecture=TINY)
    source, _ = base_source(path)
    try:
        assert fingerprint(source) == first
    finally:
        source.close()


class _TrackingSource(DictSource):
    """Hands out copies and records how many earlier ones are still alive at each get()."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.alive: list[weakref.ref] = []
        self.max_alive = 0

    def get(self, name):
        self.alive = [r for r in self.alive if r() is not None]
        self.max_alive = max(self.max_alive, len(self.alive))
        tensor = super().get(name).clone()
        self.alive.append(weakref.ref(tensor))
        return tensor


def test_fingerprint_holds_one_tensor_at_a_time(tiny_state):
    source = _TrackingSource(tiny_state)
    assert fingerprint(source) == state_dict_fingerprint(tiny_state)
    assert source.max_alive <= 1


# ---------------------------------------------------------------- architecture matching


def test_match_architecture_of_tiny(tiny_state):
    shapes = {k: tuple(v.shape) for k, v in tiny_state.items()}
    assert match_architecture(shapes).architecture == TINY
    image_only = {k: v for k, v in shapes.items() if not k.startswith("transformer.")}
    match = match_architecture(image_only, quick_gelu=False)
    assert match.architecture == TINY and match.missing
    assert all(name.startswith("transformer.") for name in match.missing)
    given = match_architecture(shapes, architecture=TINY)
    assert not given.inferred and not given.missing


def test_match_architecture_errors(tiny_state):
    shapes = {k: tuple(v.shape) for k, v in tiny_state.items()}
    with pytest.raises(InvalidInputError, match="does not fit ViT-B-32"):
        match_architecture(shapes, architecture="ViT-B-32")
    with pytest.raises(InvalidInputError, match="unknown architecture"):
        match_architecture(shapes, architecture="nope")
    with pytest.raises(InvalidInputError, match="fit no open_clip architecture"):
        match_architecture({"visual.conv1.weight": (5, 3, 7, 7), "visual.proj": (5, 3)})


def test_activation_decides_between_twin_configs():
    shapes = architecture_shapes("ViT-B-32")
    with pytest.raises(InvalidInputError, match="ViT-B-32, ViT-B-32-quickgelu"):
        match_architecture(shapes)
    assert match_architecture(shapes, quick_gelu=True).architecture == "ViT-B-32-quickgelu"
    assert match_architecture(shapes, quick_gelu=False).architecture == "ViT-B-32"
