"""Fine-tuning image encoders other than open_clip's own ViT: BatchNorm towers, timm towers.

A tiny open_clip ModifiedResNet (BatchNorm everywhere, like RN50) and a tiny timm ViT (fused
``qkv``/``proj`` attention, like open_clip's timm towers) are registered as open_clip configs
for this module only.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from test_finetune_modes import RandomImages as ModesRandomImages
from torch import nn
from torch.func import functional_call

import tvtool.models
from tvtool.errors import InvalidInputError
from tvtool.finetune import (
    FinetuneConfig,
    attention_parameter_names,
    check_encoder,
    finetune,
    get_mode,
    train,
)
from tvtool.linearize import linearized_forward
from tvtool.metadata import Mode

TINY_RN = "tvtool-test-rn"
TINY_TIMM = "tvtool-test-timm-vit"
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
# ModifiedResNet: 4 stages of stride 2 after a stride-4 stem, so image_size 32 leaves a 1x1
# map for the attention pool; its width is 32·width with heads = 32·width / head_width.
_CONFIGS = {
    TINY_RN: {"embed_dim": 32, "text_cfg": _TEXT,
              "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8,
                             "head_width": 32}},
    TINY_TIMM: {"embed_dim": 32, "text_cfg": _TEXT,
                "vision_cfg": {"image_size": 32, "timm_model_name": "tvtool_test_vit",
                               "timm_model_pretrained": False, "timm_pool": "token",
                               "timm_proj": None}},
}


def tvtool_test_vit(pretrained: bool = False, **kwargs) -> nn.Module:
    """A two-block timm ViT on 32x32 images (registered with timm by the fixture)."""
    from timm.models.vision_transformer import VisionTransformer

    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             mlp_ratio=2.0, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _tiny_configs(tmp_path_factory) -> Iterator[None]:
    root = tmp_path_factory.mktemp("configs")
    for name, config in _CONFIGS.items():
        (root / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    from open_clip import factory

    factory._MODEL_CONFIG_PATHS.remove(root)
    for name in _CONFIGS:
        factory._MODEL_CONFIGS.pop(name, None)


@pytest.fixture(scope="module")
def timm_vit() -> str:
    timm = pytest.importorskip("timm")
    timm.models.register_model(tvtool_test_vit)
    return TINY_TIMM


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    from tvtool.models import load_clip

    return load_clip(f"{TINY_RN}:random").model


class RandomImages(ModesRandomImages):
    """test_finetune_modes' seeded random images, 16 by default (short ResNet runs)."""

    def __init__(self, size: int = 16, classes: int = 4, seed: int = 0) -> None:
        super().__init__(size, classes, seed)


def _head() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return 20 * nn.functional.normalize(torch.randn(4, 32, generator=gen), dim=-1)


def _config(mode: str, base: str = f"{TINY_RN}:random", **changes) -> FinetuneConfig:
    values = dict(base=base, dataset="random", output="unused", mode=mode, steps=2,
                  batch_size=8, lr=1e-2, workers=0, lora_rank=2, lora_alpha=4.0)
    values.update(changes)
    return FinetuneConfig.from_values(values)


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in module.named_buffers()}


# --------------------------------------------------------------------------------------------
# BatchNorm: statistics frozen in every mode
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_batchnorm_statistics_stay_frozen_while_fine_tuning(resnet, mode):
    encoder = copy.deepcopy(resnet.visual)
    assert any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    before = _buffers(encoder)
    params_before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    config = _config(mode)
    adapter = get_mode(mode).build(encoder, config.options, seed=config.seed)
    train(adapter, _head(), RandomImages(), config, device=torch.device("cpu"),
          precision="fp32")
    after = _buffers(adapter.encoder)
    assert any(n.endswith("running_mean") for n in after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert adapter.training and not any(
        m.training for m in adapter.encoder.modules() if isinstance(m, nn.BatchNorm2d))
    # The BatchNorm affine weights still train.
    vector = adapter.task_vector()
    assert vector["visual.bn1.weight"].abs().max() > 0
    if mode == "full":
        changed = {n for n, p in adapter.encoder.named_parameters()
                   if not torch.equal(p, params_before[n])}
        assert "bn1.weight" in changed and "layer1.0.conv1.weight" in changed


def test_train_mode_forward_is_the_evaluated_network(resnet):
    encoder = copy.deepcopy(resnet.visual)
    adapter = get_mode("full").build(encoder, _config("full").options)
    images = RandomImages().images[:4]
    reference = copy.deepcopy(resnet.visual).eval()
    with torch.no_grad():
        expected = reference(images)
        adapter.train()
        got = adapter(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert all(torch.equal(b, r) for b, r in zip(adapter.encoder.buffers(),
                                                 reference.buffers(), strict=True))


def test_checkpoint_out_is_the_trained_network(resnet, tmp_path):
    from safetensors.torch import load_file

    images = RandomImages(seed=5).images[:4]
    trained: dict[str, torch.Tensor] = {}

    def keep_outputs(adapter):
        adapter.eval()
        with torch.no_grad():
            trained["out"] = adapter(images)

    vector_path, checkpoint = tmp_path / "tv.safetensors", tmp_path / "ft.safetensors"
    finetune(_config("full", output=str(vector_path), checkpoint_out=str(checkpoint)),
             dataset=RandomImages(), head=_head(), on_trained=keep_outputs)
    vector = load_file(str(vector_path))
    # Only parameters are stored; every buffer of the checkpoint is the base model's.
    params = {"visual." + n for n, _ in resnet.visual.named_parameters()}
    assert set(vector) == params
    tuned_state = load_file(str(checkpoint))
    for name, tensor in resnet.state_dict().items():
        if name not in params:
            assert torch.equal(tuned_state[name], tensor), name
    tuned = copy.deepcopy(resnet)
    tuned.load_state_dict(tuned_state)
    with torch.no_grad():
        reloaded = tuned.eval().visual(images)
    torch.testing.assert_close(reloaded, trained["out"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(resnet.visual.eval()(images), reloaded)


def test_a_changed_buffer_is_an_error_not_a_lost_tensor():
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3 * 32 * 32, 4)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.proj(x.flatten(1))

    adapter = get_mode("full").build(Counting(), _config("full").options)
    with pytest.raises(Exception, match="buffer 'calls' changed during fine-tuning"):
        train(adapter, _head()[:, :4].contiguous(), RandomImages(), _config("full"),
              device=torch.device("cpu"), precision="fp32")


# --------------------------------------------------------------------------------------------
# Linear mode on BatchNorm encoders
# --------------------------------------------------------------------------------------------


def test_linearized_batchnorm_encoder_matches_finite_differences(resnet):
    encoder = copy.deepcopy(resnet.visual).double().train()
    before = _buffers(encoder)
    params = {n: p.detach() for n, p in encoder.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    delta = {n: 1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
             for n, p in params.items()}
    images = RandomImages().images[:3].double()
    got = linearized_forward(encoder, None, delta, images)
    # Reference: the evaluated network (frozen statistics), central differences in float64.
    reference = copy.deepcopy(encoder).eval()
    eps = 1e-4
    with torch.no_grad():
        plus = functional_call(reference, {n: p + eps * delta[n] for n, p in params.items()},
                               (images,))
        minus = functional_call(reference, {n: p - eps * delta[n] for n, p in params.items()},
                                (images,))
        base = reference(images)
    torch.testing.assert_close(got, base + (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-8)
    for name, tensor in _buffers(encoder).items():
        assert torch.equal(tensor, before[name]), name
    assert all(m.training for m in encoder.modules())  # modes restored


def test_linear_mode_fine_tunes_a_batchnorm_encoder(tmp_path):
    from safetensors.torch import load_file

    output = tmp_path / "lin.safetensors"
    result = finetune(_config("linear", output=str(output)), dataset=RandomImages(),
                      head=_head())
    vector = load_file(str(output))
    assert result.linearized and vector and all(torch.isfinite(v).all() for v in vector.values())
    assert not any(name.endswith(("running_mean", "running_var", "num_batches_tracked"))
                   for name in vector)
    assert any(v.abs().max() > 0 for v in vector.values())


def test_linearized_jvp_path_prints_no_torch_jit_warning():
    # torch warns once per process, when forward AD is first used: so a fresh process, with
    # only torch and tvtool.linearize imported to keep it cheap, on a conv/BatchNorm net.
    code = (
        "import torch\n"
        "from torch import nn\n"
        "from tvtool.linearize import linearized_forward\n"
        "torch.manual_seed(0)\n"
        "net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU(), nn.Flatten(),\n"
        "                    nn.Linear(4 * 6 * 6, 2)).train()\n"
        "delta = {n: torch.ones_like(p) for n, p in net.named_parameters()}\n"
        "out = linearized_forward(net, None, delta, torch.randn(2, 3, 8, 8))\n"
        "print(tuple(out.shape), bool(torch.isfinite(out).all()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 2) True"
    assert "jit" not in done.stderr and "Warning" not in done.stderr, done.stderr


def test_only_the_torch_jit_warning_is_silenced(monkeypatch):
    import warnings

    import tvtool.linearize.generic as generic

    real_jvp = generic.jvp

    def noisy_jvp(*args, **kwargs):
        warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`.",
                      FutureWarning, stacklevel=2)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=2)
        return real_jvp(*args, **kwargs)

    monkeypatch.setattr(generic, "jvp", noisy_jvp)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    delta = {n: torch.ones_like(p) for n, p in net.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        linearized_forward(net, None, delta, torch.randn(1, 3, 32, 32), method="jvp")
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


# --------------------------------------------------------------------------------------------
# Attention modes on timm and ResNet towers
# --------------------------------------------------------------------------------------------


def test_attn_mode_trains_timm_qkv_and_proj(timm_vit):
    from tvtool.models import load_clip

    visual = load_clip(f"{timm_vit}:random").model.visual
    expected = [f"trunk.blocks.{i}.attn.{layer}.{kind}" for i in range(2)
                for layer in ("qkv", "proj") for kind in ("weight", "bias")]
    assert attention_parameter_names(visual) == expected
    before = {n: p.detach().clone() for n, p in visual.named_parameters()}
    config = _config("attn", base=f"{timm_vit}:random")
    adapter = get_mode("attn").build(visual, config.options)
    train(adapter, _head(), RandomImages(), config, device=torch.device("cpu"),
          precision="fp32")
    changed = {n for n, p in visual.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(expected)
    vector = adapter.task_vector()
    assert set(vector) == {"visual." + n for n in expected}
    params = dict(visual.named_parameters())
    for name in expected:
        torch.testing.assert_close(vector["visual." + name],
                                   params[name].detach() - before[name], rtol=0, atol=0)


def test_attn_mode_recognises_separate_projections_and_skips_poolers():
    class EvaStyle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
            self.v_proj, self.proj = nn.Linear(8, 8), nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)  # a sub-LayerNorm, not a projection

    class FusedWithBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24, bias=False), nn.Linear(8, 8)
            self.q_bias = nn.Parameter(torch.zeros(8))

    class Block(nn.Module):
        def __init__(self, attn: nn.Module) -> None:
            super().__init__()
            self.attn = attn
            self.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(Block(EvaStyle()), Block(FusedWithBias()))
            self.pool = FusedWithBias()  # an attention pooler: not a block's attention

    assert attention_parameter_names(Encoder()) == [
        "blocks.0.attn.q_proj.weight", "blocks.0.attn.q_proj.bias",
        "blocks.0.attn.k_proj.weight", "blocks.0.attn.v_proj.weight",
        "blocks.0.attn.v_proj.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
        "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.1.attn.proj.bias",
        "blocks.1.attn.q_bias"]


@pytest.mark.parametrize("mode", ["lora", "llora"])
def test_lora_modes_refuse_timm_towers_exactly(timm_vit, mode):
    from tvtool.models import load_clip

    visual = load_clip(f"{timm_vit}:random").model.visual
    with pytest.raises(InvalidInputError, match=r"LoRA modes \(lora, llora\) support open_clip's "
                                                r"own ViT image encoders only") as info:
        get_mode(mode).build(visual, _config(mode).options)
    assert info.value.hint == "use --mode attn or --mode full"


@pytest.mark.parametrize(("mode", "message", "hint"), [
    ("attn", "has no attention blocks", "--mode full or --mode linear"),
    ("lora", "support open_clip's own ViT image encoders only", "--mode full or --mode linear"),
    ("llora", "support open_clip's own ViT image encoders only", "--mode full or --mode linear"),
])
def test_architecture_refusals_come_before_the_model_is_built(monkeypatch, tmp_path, mode,
                                                              message, hint):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was built before the architecture was checked")

    for name in ("load_clip", "base_source", "build_zero_shot_head"):
        monkeypatch.setattr(tvtool.models, name, must_not_run)
    with pytest.raises(InvalidInputError, match=message) as info:
        finetune(_config(mode, output=str(tmp_path / "tv.safetensors")))
    assert hint in (info.value.hint or "")
    assert not list(tmp_path.iterdir())


def test_architecture_refusal_on_the_command_line(cli, tmp_path):
    result = cli(["finetune", "-b", f"{TINY_RN}:random", "-d", "synthetic:shape", "--mode",
                  "attn", "-o", str(tmp_path / "tv.safetensors")])
    assert result.exit_code == 2
    assert "ModifiedResNet) has no attention blocks" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_skeleton_check_matches_the_real_encoder(resnet, timm_vit):
    from tvtool.models import image_encoder_skeleton, load_clip

    for arch, real in ((TINY_RN, resnet.visual),
                       (timm_vit, load_clip(f"{timm_vit}:random").model.visual)):
        skeleton = image_encoder_skeleton(arch)
        assert skeleton is not None
        assert all(p.is_meta for p in skeleton.parameters())
        assert [(n, p.shape) for n, p in skeleton.named_parameters()] == \
            [(n, p.shape) for n, p in real.named_parameters()]
    assert image_encoder_skeleton("hf-hub:someone/some-model") is None
    # full and linear train any encoder; attn needs attention (the timm ViT has it).
    for mode in (Mode.FULL, Mode.LINEAR):
        check_encoder(mode, image_encoder_skeleton(TINY_RN), _config("full").options)
    check_encoder(Mode.ATTN, image_encoder_skeleton(timm_vit), _config("attn").options)
