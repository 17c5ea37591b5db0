"""peft adapters: `tvtool export-peft` and `tvtool convert ADAPTER_DIR`.

Expected values come from peft itself (``PeftModel.from_pretrained`` on the tiny open_clip
model, or ``get_peft_model`` for adapters tvtool did not write) and from factors multiplied
out here, never from tvtool's own materialiser alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tests.conftest import TINY, reference_lora_dense
from tvtool.io import open_tensors, write_tensors
from tvtool.metadata import FileMeta, Kind, Mode

ALPHA, RANK = 6.0, 2
WIDTH = 64


@pytest.fixture(scope="module")
def tiny():
    from tvtool.models import load_clip

    return load_clip(TINY)


@pytest.fixture(scope="module")
def base_fp() -> str:
    from tvtool.models import base_source, fingerprint

    source, _ = base_source(TINY)
    try:
        return fingerprint(source)
    finally:
        source.close()


@pytest.fixture(scope="module")
def images(tiny) -> torch.Tensor:
    size = tiny.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))


def _factors(tiny, targets: tuple[str, ...], seed: int = 0, rank: int = RANK
             ) -> dict[str, torch.Tensor]:
    """Random factors (B non-zero) for tvtool's LoRA targets of the tiny image encoder."""
    from tvtool.finetune.lora import lora_targets, target_shapes

    names = lora_targets(tiny.model.visual, targets)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (rows, cols) in target_shapes(tiny.model.visual, names).items():
        out[f"visual.{name}.lora_A"] = torch.randn(rank, cols, generator=gen) / cols ** 0.5
        out[f"visual.{name}.lora_B"] = 0.05 * torch.randn(rows, rank, generator=gen)
    return out


def _reference_dense(factors: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    return reference_lora_dense(factors, alpha, WIDTH)


def _write_vector(path: Path, factors, mode=Mode.LORA, fingerprint=None, linearized=False,
                  alpha: float = ALPHA, targets: str = "q,v") -> str:
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY, base_ref=TINY,
                    base_fingerprint=fingerprint, mode=mode, linearized=linearized,
                    dataset="shape", extra={"lora_alpha": repr(alpha), "lora_rank": str(RANK),
                                            "lora_targets": targets})
    write_tensors(str(path), factors, meta.to_header())
    return str(path)


def _applied_encoding(tiny, dense: dict[str, torch.Tensor], images) -> torch.Tensor:
    """encode_image of the tiny model with ``dense`` added to its weights."""
    import copy

    model = copy.deepcopy(tiny.model).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, delta in dense.items():
            state[name].add_(delta.to(state[name].dtype))
        return model.encode_image(images)


def _tvtool_applied(tiny, vector: str, tmp_path: Path, images) -> torch.Tensor:
    """encode_image of the checkpoint `tvtool apply` writes."""
    from tvtool.commands.apply import ApplyConfig
    from tvtool.commands.apply import apply as run_apply
    from tvtool.models import load_clip

    ckpt = tmp_path / "applied.safetensors"
    run_apply(ApplyConfig(base=TINY, vectors=(vector,), output=str(ckpt)))
    model = load_clip(str(ckpt)).model.eval()
    with torch.no_grad():
        return model.encode_image(images)


def _peft_encoding(tiny, adapter_dir: str, images, root: str = "clip") -> torch.Tensor:
    import copy

    peft = pytest.importorskip("peft")
    model = copy.deepcopy(tiny.model).eval()
    with torch.no_grad():
        if root == "clip":
            wrapped = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
            return wrapped.get_base_model().encode_image(images)
        wrapped = peft.PeftModel.from_pretrained(model.visual, adapter_dir).eval()
        features = wrapped(images)
        return features


def _dense_of(path: str) -> dict[str, torch.Tensor]:
    from tvtool.finetune import materialize_lora
    from tvtool.vectors import open_vector_meta

    source = open_tensors(path)
    try:
        meta = open_vector_meta(source, path)
        return materialize_lora({n: source.get(n) for n in source.keys()}, meta)
    finally:
        source.close()


def _header(path: str) -> dict[str, str]:
    source = open_tensors(path)
    try:
        return dict(source.metadata)
    finally:
        source.close()


# ---------------------------------------------------------------- export, checked by peft


@pytest.mark.parametrize(("targets", "root"), [(("q", "v"), "clip"),
                                               (("q", "k", "v", "o", "mlp"), "visual"),
                                               (("o",), "clip")])
def test_exported_adapter_in_peft_equals_tvtool_apply(tiny, images, tmp_path, cli, targets,
                                                      root):
    factors = _factors(tiny, targets)
    vector = _write_vector(tmp_path / "v.safetensors", factors, targets=",".join(targets))
    out = tmp_path / "adapter"
    result = cli(["export-peft", vector, "-o", str(out), "--module", root])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    config = json.loads((out / "adapter_config.json").read_text())
    blocks = sum(t in ("q", "k", "v") for t in targets)
    assert config["r"] == RANK * max(blocks, 1)
    assert config["lora_alpha"] == ALPHA * max(blocks, 1)  # scale alpha/r unchanged
    prefix = "visual." if root == "clip" else ""
    assert config["target_modules"][0] == f"{prefix}transformer.resblocks.0.attn"

    expected = _tvtool_applied(tiny, vector, tmp_path, images)
    reference = _applied_encoding(tiny, _reference_dense(factors, ALPHA), images)
    got = _peft_encoding(tiny, str(out), images, root)
    base = _applied_encoding(tiny, {}, images)
    assert (expected - base).abs().max() > 1e-3  # the vector changes the model
    torch.testing.assert_close(expected, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_llora_exports_and_round_trips_as_llora(tiny, images, tmp_path, cli, base_fp):
    factors = _factors(tiny, ("q", "v"), seed=3)
    vector = _write_vector(tmp_path / "l.safetensors", factors, mode=Mode.LLORA,
                           fingerprint=base_fp)
    out = tmp_path / "adapter"
    assert cli(["export-peft", vector, "-o", str(out)]).exit_code == 0
    back = tmp_path / "back.safetensors"
    result = cli(["convert", str(out), "-o", str(back), "--json"])  # architecture recorded
    assert result.exit_code == 0, result.stderr
    header = _header(str(back))
    assert header["tvtool.mode"] == "llora"
    assert header["tvtool.base_fingerprint"] == base_fp
    assert header["tvtool.architecture"] == TINY and header["tvtool.dataset"] == "shape"
    torch.testing.assert_close(_peft_encoding(tiny, str(out), images),
                               _tvtool_applied(tiny, vector, tmp_path, images),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("root", ["clip", "visual"])
def test_round_trip_gives_the_same_dense_deltas(tiny, tmp_path, cli, base_fp, root):
    factors = _factors(tiny, ("q", "k", "v", "o", "mlp"), seed=1)
    vector = _write_vector(tmp_path / "v.safetensors", factors, fingerprint=base_fp)
    out = tmp_path / "adapter"
    assert cli(["export-peft", vector, "-o", str(out), "--module", root]).exit_code == 0
    back = tmp_path / "back.safetensors"
    result = cli(["convert", str(out), "--base", TINY, "-o", str(back), "-d", "shape"])
    assert result.exit_code == 0, result.stderr
    header = _header(str(back))
    assert header["tvtool.mode"] == "lora" and header["tvtool.base_fingerprint"] == base_fp
    assert header["tvtool.lora_targets"] == "q,k,v,o,mlp"
    got, want = _dense_of(str(back)), _reference_dense(factors, ALPHA)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------- adapters peft trained


def _peft_adapter(tiny, tmp_path: Path, root: str = "clip", **config) -> tuple[str, object]:
    """An adapter made by peft itself (random B), saved; returns its dir and the model."""
    import copy

    peft = pytest.importorskip("peft")
    model = copy.deepcopy(tiny.model).eval()
    target = model if root == "clip" else model.visual
    prefix = "visual." if root == "clip" else ""
    defaults = {"r": 4, "lora_alpha": 8, "target_modules": [
        f"{prefix}transformer.resblocks.{i}.{m}" for i in range(3) for m in ("attn", "mlp.c_fc")]}
    wrapped = peft.get_peft_model(target, peft.LoraConfig(**{**defaults, **config}))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    out = tmp_path / f"peft-{root}"
    wrapped.save_pretrained(str(out))
    return str(out), wrapped


@pytest.mark.parametrize(("config", "factors"), [
    ({}, True),
    ({"use_rslora": True, "r": 4}, True),
    ({"rank_pattern": {"resblocks.1.attn": 2}, "alpha_pattern": {"resblocks.1.attn": 4}}, True),
    ({"alpha_pattern": {"mlp.c_fc": 3}}, False),
])
def test_peft_trained_adapter_becomes_a_vector(tiny, images, tmp_path, cli, config, factors):
    adapter, wrapped = _peft_adapter(tiny, tmp_path, **config)
    with torch.no_grad():
        expected = wrapped.get_base_model().encode_image(images)
    out = tmp_path / "imported.safetensors"
    result = cli(["convert", adapter, "--base", TINY, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["details"]["factors"] is factors
    assert summary["details"]["module"] == "clip"  # from peft's auto_mapping
    header = _header(str(out))
    assert header.get("tvtool.mode") == ("lora" if factors else None)
    torch.testing.assert_close(_tvtool_applied(tiny, str(out), tmp_path, images), expected,
                               atol=1e-5, rtol=1e-5)


def test_peft_adapter_on_the_image_tower(tiny, images, tmp_path, cli):
    adapter, wrapped = _peft_adapter(tiny, tmp_path, root="visual")
    with torch.no_grad():
        expected = wrapped(images)
    out = tmp_path / "imported.safetensors"
    result = cli(["convert", adapter, "--architecture", TINY, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "image tower" in result.stderr
    torch.testing.assert_close(_tvtool_applied(tiny, str(out), tmp_path, images), expected,
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- refusals


@pytest.fixture()
def exported(tiny, tmp_path, cli) -> Path:
    """A valid adapter directory (exported by tvtool, no tvtool metadata kept)."""
    vector = _write_vector(tmp_path / "v.safetensors", _factors(tiny, ("q", "v", "mlp")))
    out = tmp_path / "adapter"
    assert cli(["export-peft", vector, "-o", str(out)]).exit_code == 0
    # As a foreign adapter: peft's own metadata only.
    source = open_tensors(str(out / "adapter_model.safetensors"))
    tensors = {n: source.get(n) for n in source.keys()}
    source.close()
    (out / "adapter_model.safetensors").unlink()
    write_tensors(str(out / "adapter_model.safetensors"), tensors, {"format": "pt"})
    return out


def _edit(directory: Path, config=None, tensors=None) -> None:
    if config is not None:
        path = directory / "adapter_config.json"
        document = json.loads(path.read_text())
        document.update(config)
        path.write_text(json.dumps(document))
    if tensors is not None:
        path = directory / "adapter_model.safetensors"
        source = open_tensors(str(path))
        current = {n: source.get(n) for n in source.keys()}
        source.close()
        path.unlink()
        save_file(tensors(current), str(path), {"format": "pt"})  # NaN allowed here


KEY = "base_model.model.visual.transformer.resblocks.0.attn"


def _shape_mismatch(t):
    return {**t, KEY + ".lora_A.weight": torch.zeros(4, 32)}


def _missing_b(t):
    return {k: v for k, v in t.items() if k != KEY + ".lora_B.weight"}


def _missing_module(t):
    return {k: v for k, v in t.items() if ".resblocks.2.attn." not in k}


def _unknown_module(t):
    return {**t, "base_model.model.visual.nope.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.visual.nope.lora_B.weight": torch.zeros(64, 4)}


def _dora(t):
    return {**t, KEY + ".lora_magnitude_vector": torch.ones(192)}


def _out_proj_alone(t):
    return {**t, KEY + ".out_proj.lora_A.weight": torch.zeros(4, 64),
            KEY + ".out_proj.lora_B.weight": torch.zeros(64, 4)}


def _nan(t):
    bad = t[KEY + ".lora_B.weight"].clone()
    bad[0, 0] = float("nan")
    return {**t, KEY + ".lora_B.weight": bad}


@pytest.mark.parametrize(("config", "tensors", "message"), [
    ({"use_dora": True}, None, "uses DoRA (use_dora)"),
    (None, _dora, "is a DoRA adapter"),
    ({"peft_type": "IA3"}, None, "is a peft IA3 adapter"),
    ({"bias": "all"}, None, "trains biases (bias='all')"),
    ({"modules_to_save": ["visual.ln_post"]}, None, "also saves whole modules"),
    ({"init_lora_weights": "pissa"}, None, "rewrites the base weights"),
    ({"use_some_future_variant": True}, None, "'use_some_future_variant', unknown to tvtool"),
    ({"target_modules": ["visual.transformer.resblocks.0.attn", "q_proj"]}, None,
     "target_modules names modules the model does not have: ['q_proj']"),
    ({"target_modules": ["visual.transformer.resblocks.0.attn"]}, None,
     "which adapter_config.json's target_modules does not select"),
    ({"r": 3}, None, "the model and r=3 need"),
    ({"rank_pattern": {"resblocks.0.attn": 2}}, None, "the model and r=2 need"),
    ({"lora_alpha": "many"}, None, "lora_alpha must be a finite number"),
    (None, _shape_mismatch, "has lora_A (4, 32)"),
    (None, _missing_b, "lacks 'base_model.model.visual.transformer.resblocks.0.attn.lora_B"),
    (None, _missing_module, "lacks the LoRA weights of 1 targeted modules"),
    (None, _unknown_module, "adapts 'visual.nope', which is not a module of the model"),
    (None, _out_proj_alone, "never calls its out_proj's forward"),
    (None, _nan, "contain NaN or Inf"),
    # Regular expressions that make Python's re backtrack for years: bounded matching.
    ({"target_modules": "(.*)*z"}, None, "target_modules '(.*)*z' matches no module"),
    ({"target_modules": r"(visual\..*)\1"}, None, "uses a backreference"),
    ({"exclude_modules": "(a|a)*(?=z)"}, None, "exclude_modules '(a|a)*(?=z)' uses a lookahead"),
    ({"rank_pattern": {"x{999}y{999}z{999}": 2}}, None, "expands to more than 2000 automaton"),
])
def test_bad_adapters_are_refused(exported, tmp_path, cli, config, tensors, message):
    _edit(exported, config, tensors)
    out = tmp_path / "out.safetensors"
    result = cli(["convert", str(exported), "--base", TINY, "-o", str(out)])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.startswith("tvtool: error:") and result.stderr.count("\n") == 1
    assert not out.exists()


def test_pickled_adapter_is_refused_unread(exported, tmp_path, cli):
    (exported / "adapter_model.safetensors").unlink()
    # Unpickling this would run code (and the file is not even a valid pickle past it).
    (exported / "adapter_model.bin").write_bytes(b"\x80\x04cposix\nsystem\n" + b"\x00" * 32)
    out = tmp_path / "out.safetensors"
    result = cli(["convert", str(exported), "--base", TINY, "-o", str(out)])
    assert result.exit_code == 2
    assert "holds only adapter_model.bin, a pickle, which tvtool never unpickles" in result.stderr
    assert not out.exists()


def test_adapter_needs_an_architecture_and_a_root(exported, tmp_path, cli):
    out = tmp_path / "out.safetensors"
    result = cli(["convert", str(exported), "-o", str(out)])
    assert result.exit_code == 2
    assert "does not say which open_clip model it adapts" in result.stderr
    # Without visual. prefixes and the third block (the text tower has two), the names fit
    # both the text tower and the image tower.
    targets = json.loads((exported / "adapter_config.json").read_text())["target_modules"]
    _edit(exported, {"target_modules": [m.removeprefix("visual.") for m in targets
                                        if ".resblocks.2." not in m], "auto_mapping": None},
          lambda t: {k.replace("model.visual.", "model."): v for k, v in t.items()
                     if ".resblocks.2." not in k})
    result = cli(["convert", str(exported), "--base", TINY, "-o", str(out)])
    assert result.exit_code == 2
    assert "cannot tell whether the adapter was trained on the whole" in result.stderr
    assert not out.exists()
    result = cli(["convert", str(exported), "--base", TINY, "-o", str(out), "--module",
                  "visual"])
    assert result.exit_code == 0, result.stderr
    assert any(k.startswith("visual.transformer.") for k in _header_keys(out))


def _header_keys(path: Path) -> list[str]:
    source = open_tensors(str(path))
    try:
        return source.keys()
    finally:
        source.close()


@pytest.mark.parametrize(("mode", "linearized", "message"), [
    (Mode.LLORA_NET, True, "is an llora-net vector"),
    (Mode.FULL, False, "is a full vector; a peft LoRA adapter holds low-rank factors"),
])
def test_export_refuses_vectors_peft_cannot_express(tiny, tmp_path, cli, mode, linearized,
                                                    message):
    if mode is Mode.FULL:
        tensors = {"visual.transformer.resblocks.0.attn.out_proj.weight": torch.ones(64, 64)}
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY, mode=mode)
        vector = str(tmp_path / "v.safetensors")
        write_tensors(vector, tensors, meta.to_header())
    else:
        vector = _write_vector(tmp_path / "v.safetensors", _factors(tiny, ("q", "v")),
                               mode=mode, linearized=linearized)
    out = tmp_path / "adapter"
    result = cli(["export-peft", vector, "-o", str(out)])
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tvtool-peft-")]


def test_export_refuses_a_used_directory_and_the_text_tower(tiny, tmp_path, cli):
    vector = _write_vector(tmp_path / "v.safetensors", _factors(tiny, ("q", "v")))
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep")
    result = cli(["export-peft", vector, "-o", str(used)])
    assert result.exit_code == 2 and "is not an empty directory" in result.stderr
    result = cli(["export-peft", vector, "-o", "-"])
    assert result.exit_code == 2 and "writes a directory, not stdout" in result.stderr
    result = cli(["convert", vector, "-o", str(tmp_path / "c.safetensors"), "--module", "clip"])
    assert result.exit_code == 2 and "--module is for peft adapter directories" in result.stderr
    factors = {k.replace("visual.", "", 1): v for k, v in _factors(tiny, ("o",)).items()}
    text = _write_vector(tmp_path / "t.safetensors", factors)
    result = cli(["export-peft", text, "-o", str(tmp_path / "a"), "--module", "visual"])
    assert result.exit_code == 2 and "outside the image tower" in result.stderr
    shutil.rmtree(used)


# ---------------------------------------------------------------- the mapping, any targets


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(targets=st.sets(st.sampled_from(["q", "k", "v", "o", "mlp"]), min_size=1),
       rank=st.integers(1, 5), alpha=st.sampled_from([1.0, 4.0, 6.0, 32.0, 0.5]),
       root=st.sampled_from(["clip", "visual"]), seed=st.integers(0, 10))
def test_mapping_round_trip_property(tiny, targets, rank, alpha, root, seed):
    from tvtool.finetune import materialize_lora
    from tvtool.formats.peft_adapters import lora_vector_to_peft, peft_to_lora_vector
    from tvtool.models.modules import module_table

    factors = _factors(tiny, tuple(sorted(targets)), seed=seed, rank=rank)
    modules = module_table(TINY, root)
    adapter = lora_vector_to_peft(factors, alpha, modules, root, label="v")
    # Every peft module has one rank, and lora_alpha / r is the vector's scale alpha / rank.
    ranks = {t.shape[0] for k, t in adapter.tensors.items() if k.endswith("lora_A.weight")}
    assert ranks == {adapter.config["r"]}
    assert adapter.config["lora_alpha"] / adapter.config["r"] == pytest.approx(alpha / rank)
    back = peft_to_lora_vector(adapter.config, adapter.tensors, modules, root, label="a")
    assert back.lora is not None
    got = materialize_lora(back.tensors, back.lora)
    want = _reference_dense(factors, alpha)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], atol=1e-7, rtol=1e-6)


def test_adapter_card_is_publishable_and_says_what_to_load_it_onto(tiny, tmp_path, cli):
    # A vector whose recorded base and dataset are local paths: the card names files only.
    vector = tmp_path / "v.safetensors"
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY,
                    base_ref=f"{TINY}:{tmp_path}/private/base.safetensors", mode=Mode.LORA,
                    dataset=f"imagefolder:{tmp_path}/private/pets",
                    extra={"lora_alpha": repr(ALPHA), "lora_rank": str(RANK),
                           "lora_targets": "q,v"})
    write_tensors(str(vector), _factors(tiny, ("q", "v")), meta.to_header())
    cards = {}
    for root in ("clip", "visual"):
        out = tmp_path / f"adapter-{root}"
        result = cli(["export-peft", str(vector), "-o", str(out), "--module", root,
                      "--license", "mit"])
        assert result.exit_code == 0, result.stderr
        cards[root] = (out / "README.md").read_text()
    for card in cards.values():
        assert str(tmp_path) not in card and "/private/" not in card
        assert card.startswith("---\nlicense: mit\n")
        assert f"`{TINY}:base.safetensors`" in card and "imagefolder:pets" in card
    assert "Load it onto the image tower (`model.visual`), not onto the whole model" \
        in cards["visual"]
    assert "Load it onto the whole open_clip model (`model`)" in cards["clip"]
    result = cli(["export-peft", str(vector), "-o", str(tmp_path / "bad"), "--license", "MIT!"])
    assert result.exit_code == 2 and "--license" in result.stderr


# ---------------------------------------------------------------- peft versions


@pytest.mark.parametrize(("version", "applied"), [
    ("0.21.2", 2.0), ("0.11.1", 2.0), ("0.22.0", 1.0), ("0.22.1.dev0", 1.0), ("1.0.0", 1.0),
    (None, 1.0)])
def test_out_projection_counts_twice_before_peft_0_22(version, applied):
    from tvtool.formats.peft_adapters import mha_out_proj_applied

    assert mha_out_proj_applied(version) == applied


def test_convert_reads_the_out_projection_as_the_recorded_peft_computes_it(tiny, tmp_path, cli):
    adapter, _ = _peft_adapter(tiny, tmp_path)
    config_path = Path(adapter) / "adapter_config.json"
    dense = {}
    for version in ("0.21.2", "0.22.0", "not-a-version"):
        config = json.loads(config_path.read_text())
        config["peft_version"] = version
        config_path.write_text(json.dumps(config))
        out = tmp_path / f"imported-{version}.safetensors"
        result = cli(["convert", adapter, "--base", TINY, "-o", str(out)])
        if version == "not-a-version":
            assert result.exit_code == 2 and "not a peft version" in result.stderr
            assert not out.exists()
            continue
        assert result.exit_code == 0, result.stderr
        dense[version] = _dense_of(str(out))
    outs = [name for name in dense["0.22.0"] if name.endswith("out_proj.weight")]
    assert outs and sorted(dense["0.21.2"]) == sorted(dense["0.22.0"])
    for name, once in dense["0.22.0"].items():
        factor = 2.0 if name in outs else 1.0
        torch.testing.assert_close(dense["0.21.2"][name], factor * once, rtol=0, atol=0)


@pytest.mark.parametrize("recorded", ["1", "2", "3", "two"])
def test_convert_uses_the_factor_export_recorded(tiny, tmp_path, cli, recorded):
    factors = _factors(tiny, ("q", "v", "o"), seed=5)
    vector = _write_vector(tmp_path / "v.safetensors", factors)
    out = tmp_path / "adapter"
    assert cli(["export-peft", vector, "-o", str(out)]).exit_code == 0
    source = open_tensors(str(out / "adapter_model.safetensors"))
    tensors = {n: source.get(n) for n in source.keys()}
    metadata = dict(source.metadata)
    source.close()
    assert metadata["tvtool.out_proj_applied"] == "2"  # what a loading peft applies
    metadata["tvtool.out_proj_applied"] = recorded
    (out / "adapter_model.safetensors").unlink()
    write_tensors(str(out / "adapter_model.safetensors"), tensors, metadata)
    back = tmp_path / "back.safetensors"
    result = cli(["convert", str(out), "--base", TINY, "-o", str(back)])
    if recorded not in ("1", "2"):
        assert result.exit_code == 2 and "out_proj_applied must be 1 or 2" in result.stderr
        assert not back.exists()
        return
    assert result.exit_code == 0, result.stderr
    got, want = _dense_of(str(back)), _reference_dense(factors, ALPHA)
    assert any(name.endswith("out_proj.weight") for name in want)
    for name in want:
        # export halved B; the recorded factor scales it back (2: exact round trip)
        factor = float(recorded) / 2 if name.endswith("out_proj.weight") else 1.0
        torch.testing.assert_close(got[name].double(), factor * want[name], atol=1e-7,
                                   rtol=1e-6)
