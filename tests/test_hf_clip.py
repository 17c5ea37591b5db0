"""`tvtool convert` of Hugging Face `transformers` CLIP checkpoints (no transformers import).

The checkpoints are built here, in transformers' naming, from the tiny open_clip config; the
reference forward below computes CLIP the way transformers' modeling_clip does, from the
HF-named tensors only (separate q/k/v, embedding tables, Linear projections), so the mapping
is checked against an independent computation, not against tvtool's own output.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.conftest import TINY

WIDTH, LAYERS, HEADS, PATCH, IMAGE = 64, 3, 4, 4, 32
T_WIDTH, T_LAYERS, T_HEADS, CONTEXT, VOCAB = 64, 2, 4, 16, 49408
EMBED = 64


def _layer(gen: torch.Generator, prefix: str, width: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=gen)

    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out[f"{prefix}self_attn.{proj}.weight"] = rnd(width, width, scale=width ** -0.5)
        out[f"{prefix}self_attn.{proj}.bias"] = rnd(width)
    for norm in ("layer_norm1", "layer_norm2"):
        out[f"{prefix}{norm}.weight"] = 1 + rnd(width)
        out[f"{prefix}{norm}.bias"] = rnd(width)
    out[f"{prefix}mlp.fc1.weight"] = rnd(4 * width, width, scale=width ** -0.5)
    out[f"{prefix}mlp.fc1.bias"] = rnd(4 * width)
    out[f"{prefix}mlp.fc2.weight"] = rnd(width, 4 * width, scale=(4 * width) ** -0.5)
    out[f"{prefix}mlp.fc2.bias"] = rnd(width)
    return out


def hf_state(seed: int = 0, *, text: bool = True, projection: bool = True,
             position_ids: bool = True) -> dict[str, torch.Tensor]:
    """A random CLIP state dict in transformers' names (CLIPModel by default)."""
    gen = torch.Generator().manual_seed(seed)
    positions = (IMAGE // PATCH) ** 2 + 1
    v = "vision_model."
    sd = {
        f"{v}embeddings.class_embedding": torch.randn(WIDTH, generator=gen) * 0.1,
        f"{v}embeddings.patch_embedding.weight":
            torch.randn(WIDTH, 3, PATCH, PATCH, generator=gen) * 0.1,
        f"{v}embeddings.position_embedding.weight":
            torch.randn(positions, WIDTH, generator=gen) * 0.1,
        f"{v}pre_layrnorm.weight": 1 + 0.05 * torch.randn(WIDTH, generator=gen),
        f"{v}pre_layrnorm.bias": 0.05 * torch.randn(WIDTH, generator=gen),
        f"{v}post_layernorm.weight": 1 + 0.05 * torch.randn(WIDTH, generator=gen),
        f"{v}post_layernorm.bias": 0.05 * torch.randn(WIDTH, generator=gen),
    }
    if position_ids:
        sd[f"{v}embeddings.position_ids"] = torch.arange(positions)[None]
    for i in range(LAYERS):
        sd.update(_layer(gen, f"{v}encoder.layers.{i}.", WIDTH))
    if projection:
        sd["visual_projection.weight"] = torch.randn(EMBED, WIDTH, generator=gen) * 0.1
    if text:
        t = "text_model."
        sd[f"{t}embeddings.token_embedding.weight"] = \
            torch.randn(VOCAB, T_WIDTH, generator=gen) * 0.1
        sd[f"{t}embeddings.position_embedding.weight"] = \
            torch.randn(CONTEXT, T_WIDTH, generator=gen) * 0.1
        if position_ids:
            sd[f"{t}embeddings.position_ids"] = torch.arange(CONTEXT)[None]
        for i in range(T_LAYERS):
            sd.update(_layer(gen, f"{t}encoder.layers.{i}.", T_WIDTH))
        sd[f"{t}final_layer_norm.weight"] = 1 + 0.05 * torch.randn(T_WIDTH, generator=gen)
        sd[f"{t}final_layer_norm.bias"] = 0.05 * torch.randn(T_WIDTH, generator=gen)
        sd["text_projection.weight"] = torch.randn(EMBED, T_WIDTH, generator=gen) * 0.1
        sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return sd


# ---------------------------------------------------------------- reference forward (HF names)


def _act(x: torch.Tensor, quick: bool) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x) if quick else F.gelu(x)


def _encoder(sd, prefix: str, x: torch.Tensor, layers: int, heads: int, quick: bool,
             causal: bool) -> torch.Tensor:
    batch, tokens, width = x.shape
    head_dim = width // heads
    mask = torch.full((tokens, tokens), float("-inf")).triu(1) if causal else None
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."

        def lin(h, name, p=p):
            return h @ sd[f"{p}{name}.weight"].T + sd[f"{p}{name}.bias"]

        h = F.layer_norm(x, (width,), sd[f"{p}layer_norm1.weight"], sd[f"{p}layer_norm1.bias"])
        q, k, v = (lin(h, f"self_attn.{n}").view(batch, tokens, heads, head_dim).transpose(1, 2)
                   for n in ("q_proj", "k_proj", "v_proj"))
        scores = (q * head_dim ** -0.5) @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores + mask
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + lin(attended, "self_attn.out_proj")
        h = F.layer_norm(x, (width,), sd[f"{p}layer_norm2.weight"], sd[f"{p}layer_norm2.bias"])
        x = x + lin(_act(lin(h, "mlp.fc1"), quick), "mlp.fc2")
    return x


def reference_image(sd, images: torch.Tensor, quick: bool = False,
                    project: bool = True) -> torch.Tensor:
    v = "vision_model."
    patches = F.conv2d(images, sd[f"{v}embeddings.patch_embedding.weight"], stride=PATCH)
    patches = patches.flatten(2).transpose(1, 2)
    cls = sd[f"{v}embeddings.class_embedding"].expand(images.shape[0], 1, -1)
    x = torch.cat([cls, patches], 1) + sd[f"{v}embeddings.position_embedding.weight"]
    x = F.layer_norm(x, (WIDTH,), sd[f"{v}pre_layrnorm.weight"], sd[f"{v}pre_layrnorm.bias"])
    x = _encoder(sd, v, x, LAYERS, HEADS, quick, causal=False)
    pooled = F.layer_norm(x[:, 0], (WIDTH,), sd[f"{v}post_layernorm.weight"],
                          sd[f"{v}post_layernorm.bias"])
    return pooled @ sd["visual_projection.weight"].T if project else pooled


def reference_text(sd, ids: torch.Tensor, quick: bool = False) -> torch.Tensor:
    t = "text_model."
    x = sd[f"{t}embeddings.token_embedding.weight"][ids] \
        + sd[f"{t}embeddings.position_embedding.weight"][: ids.shape[1]]
    x = _encoder(sd, t, x, T_LAYERS, T_HEADS, quick, causal=True)
    x = F.layer_norm(x, (T_WIDTH,), sd[f"{t}final_layer_norm.weight"],
                     sd[f"{t}final_layer_norm.bias"])
    pooled = x[torch.arange(ids.shape[0]), ids.argmax(-1)]  # end-of-text has the largest id
    return pooled @ sd["text_projection.weight"].T


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=gen)
    ids = torch.zeros(3, CONTEXT, dtype=torch.long)
    for row, length in enumerate((4, 9, CONTEXT)):
        ids[row, : length - 1] = torch.randint(1, VOCAB - 2, (length - 1,), generator=gen)
        ids[row, length - 1] = VOCAB - 1  # end-of-text
    return images, ids


def _open_clip_model(quick: bool):
    import open_clip

    import tvtool.models  # noqa: F401  (registers the tiny config)

    return open_clip.create_model(TINY, force_quick_gelu=quick).eval()


# ---------------------------------------------------------------- the mapping


@pytest.mark.parametrize("quick", [False, True])
def test_mapped_clip_model_computes_the_hf_forward(quick):
    from tvtool.models import hf_clip_to_open_clip

    sd = hf_state()
    mapped = hf_clip_to_open_clip(sd)
    assert mapped.model_class == "CLIPModel"
    model = _open_clip_model(quick)
    model.load_state_dict(mapped.tensors, strict=True)
    images, ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images),
                                   reference_image(sd, images, quick), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(ids), reference_text(sd, ids, quick),
                                   atol=2e-5, rtol=1e-4)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))


def test_fused_projection_layout():
    from tvtool.models import hf_clip_to_open_clip

    sd = hf_state()
    out = hf_clip_to_open_clip(sd).tensors
    p = "vision_model.encoder.layers.1.self_attn."
    fused = out["visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused[:WIDTH], sd[p + "q_proj.weight"])
    assert torch.equal(fused[WIDTH:2 * WIDTH], sd[p + "k_proj.weight"])
    assert torch.equal(fused[2 * WIDTH:], sd[p + "v_proj.weight"])
    assert torch.equal(out["visual.proj"], sd["visual_projection.weight"].T)
    assert torch.equal(out["text_projection"], sd["text_projection.weight"].T)
    assert not any("position_ids" in n for n in out)


def test_vision_model_without_projection_and_bare_v5_names():
    from tvtool.models import hf_clip_to_open_clip, is_hf_clip

    sd = hf_state(text=False, projection=False)
    mapped = hf_clip_to_open_clip(sd)
    assert mapped.model_class == "CLIPVisionModel"
    assert "visual.proj" not in mapped.tensors
    assert all(n.startswith("visual.") for n in mapped.tensors)
    bare = {n.removeprefix("vision_model."): t for n, t in sd.items()}
    assert is_hf_clip(bare)
    again = hf_clip_to_open_clip(bare)
    assert again.tensors.keys() == mapped.tensors.keys()
    with_proj = hf_clip_to_open_clip(hf_state(text=False))
    assert with_proj.model_class == "CLIPVisionModelWithProjection"


def test_unknown_or_incomplete_names_are_refused():
    from tvtool.errors import InvalidInputError
    from tvtool.models import hf_clip_to_open_clip

    sd = hf_state(text=False)
    with pytest.raises(InvalidInputError, match="not CLIP weights"):
        hf_clip_to_open_clip({**sd, "vision_model.encoder.layers.0.extra.weight": torch.ones(1)})
    with pytest.raises(InvalidInputError, match="not CLIP weights"):
        hf_clip_to_open_clip({**sd, "classifier.weight": torch.ones(1)})
    partial = dict(sd)
    del partial["vision_model.encoder.layers.2.self_attn.k_proj.bias"]
    with pytest.raises(InvalidInputError, match="k_proj"):
        hf_clip_to_open_clip(partial)


def test_activation_from_config():
    from tvtool.errors import InvalidInputError
    from tvtool.models import hf_activation

    assert hf_activation({"vision_config": {"hidden_act": "quick_gelu"},
                          "text_config": {"hidden_act": "quick_gelu"}}) is True
    assert hf_activation({"hidden_act": "gelu"}) is False
    assert hf_activation({}) is None
    with pytest.raises(InvalidInputError, match="silu"):
        hf_activation({"hidden_act": "silu"})


def test_openai_b32_shapes_pick_the_quickgelu_architecture():
    """Names and shapes only (meta tensors): a ViT-B/32 CLIPModel maps onto open_clip's."""
    from tvtool.models import hf_clip_to_open_clip, match_architecture

    def meta_layer(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}self_attn.{p}.{k}": torch.empty(
                (width, width) if k == "weight" else (width,), device="meta")
            for p in ("q_proj", "k_proj", "v_proj", "out_proj") for k in ("weight", "bias")} | {
            f"{prefix}{n}.{k}": torch.empty(width, device="meta")
            for n in ("layer_norm1", "layer_norm2") for k in ("weight", "bias")} | {
            f"{prefix}mlp.fc1.weight": torch.empty(4 * width, width, device="meta"),
            f"{prefix}mlp.fc1.bias": torch.empty(4 * width, device="meta"),
            f"{prefix}mlp.fc2.weight": torch.empty(width, 4 * width, device="meta"),
            f"{prefix}mlp.fc2.bias": torch.empty(width, device="meta")}

    def e(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta")

    sd = {"vision_model.embeddings.class_embedding": e(768),
          "vision_model.embeddings.patch_embedding.weight": e(768, 3, 32, 32),
          "vision_model.embeddings.position_embedding.weight": e(50, 768),
          "vision_model.pre_layrnorm.weight": e(768), "vision_model.pre_layrnorm.bias": e(768),
          "vision_model.post_layernorm.weight": e(768),
          "vision_model.post_layernorm.bias": e(768),
          "visual_projection.weight": e(512, 768), "text_projection.weight": e(512, 512),
          "logit_scale": e(()),
          "text_model.embeddings.token_embedding.weight": e(49408, 512),
          "text_model.embeddings.position_embedding.weight": e(77, 512),
          "text_model.final_layer_norm.weight": e(512),
          "text_model.final_layer_norm.bias": e(512)}
    for i in range(12):
        sd |= meta_layer(f"vision_model.encoder.layers.{i}.", 768)
        sd |= meta_layer(f"text_model.encoder.layers.{i}.", 512)
    shapes = {n: tuple(t.shape) for n, t in hf_clip_to_open_clip(sd).tensors.items()}
    quick = match_architecture(shapes, quick_gelu=True)
    assert quick.architecture == "ViT-B-32-quickgelu" and not quick.missing
    assert match_architecture(shapes, quick_gelu=False).architecture == "ViT-B-32"


# ---------------------------------------------------------------- the convert command


def _hf_dir(tmp_path, sd, act: str | None = "gelu", name: str = "model.safetensors"):
    folder = tmp_path / "hf"
    folder.mkdir()
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / name))
    else:
        torch.save(sd, folder / name)
    if act is not None:
        config = {"architectures": ["CLIPModel"], "model_type": "clip",
                  "text_config": {"hidden_act": act}, "vision_config": {"hidden_act": act}}
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_convert_hf_directory_loads_in_tvtool_and_open_clip(cli, tmp_path, name):
    from tvtool.models import load_clip

    sd = hf_state(seed=3)
    folder = _hf_dir(tmp_path, sd, name=name)
    out = tmp_path / "converted.safetensors"
    result = cli(["convert", str(folder), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["details"] == {"architecture": TINY, "missing": 0}
    assert "CLIPModel" in result.stderr and "gelu" in result.stderr
    model = load_clip(str(out)).model
    images, ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference_image(sd, images),
                                   atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(ids), reference_text(sd, ids),
                                   atol=2e-5, rtol=1e-4)


def test_convert_hf_file_activation_checks(cli, tmp_path):
    sd = hf_state(seed=4)
    quick = _hf_dir(tmp_path, sd, act="quick_gelu")
    out = tmp_path / "out.safetensors"
    refused = cli(["convert", str(quick / "model.safetensors"), "-o", str(out)])
    assert refused.exit_code == 2
    assert "QuickGELU" in refused.stderr and not out.exists()
    # No config: the tiny config is the only fit, so the state dict converts as it is.
    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare))
    assert cli(["convert", str(bare), "-o", str(out)]).exit_code == 0


def test_vision_model_converts_partial_then_extracts(cli, tmp_path, files):
    from tests.conftest import load

    sd = hf_state(seed=5, text=False, projection=False)
    folder = _hf_dir(tmp_path, sd)
    out = tmp_path / "vision.safetensors"
    result = cli(["convert", str(folder), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "CLIPVisionModel" in result.stderr and "--allow-missing" in result.stderr
    vector = tmp_path / "tv.safetensors"
    ok = cli(["extract", str(out), "--base", files["base"], "-o", str(vector),
              "--allow-missing"])
    assert ok.exit_code == 0, ok.stderr
    tv, base = load(str(vector)), load(files["base"])
    fused = torch.cat([sd[f"vision_model.encoder.layers.0.self_attn.{p}_proj.weight"]
                       for p in "qkv"])
    name = "visual.transformer.resblocks.0.attn.in_proj_weight"
    torch.testing.assert_close(tv[name], fused - base[name])
    assert not tv.get("visual.proj", torch.zeros(1)).any()
