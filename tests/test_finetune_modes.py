"""What each fine-tuning mode trains, how it runs, and the task vector it produces."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.utils.data import Dataset

from tvtool.errors import InvalidInputError, UsageError
from tvtool.finetune import (
    MODES,
    FinetuneConfig,
    LoraOptions,
    NoOptions,
    attention_parameter_names,
    finetune,
    get_mode,
    lora_targets,
    materialize_lora,
    train,
)
from tvtool.linearize import jvp_reference, linearized_forward
from tvtool.metadata import FileMeta, Kind, Mode

BASE = "tvtool-tiny:random"


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class RandomImages(Dataset):
    """Seeded random images with labels tied to the mean of the first channel."""

    def __init__(self, size: int = 32, classes: int = 4, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, 32, 32, generator=gen)
        self.labels = torch.randint(0, classes, (size,), generator=gen)
        self.images[:, 0] += self.labels.view(-1, 1, 1).float()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@pytest.fixture(scope="module")
def base_model() -> nn.Module:
    from tvtool.models import load_clip

    return load_clip(BASE).model


@pytest.fixture(scope="module")
def head() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return 20 * nn.functional.normalize(torch.randn(4, 64, generator=gen), dim=-1)


def _config(mode: str, **changes) -> FinetuneConfig:
    values = dict(base=BASE, dataset="random", output="unused", mode=mode, steps=3,
                  batch_size=8, lr=1e-3, workers=0, lora_rank=4, lora_alpha=8.0)
    values.update(changes)
    return FinetuneConfig.from_values(values)


def _trained(mode: str, base_model: nn.Module, head: torch.Tensor, **changes):
    config = _config(mode, **changes)
    encoder = copy.deepcopy(base_model.visual)
    adapter = get_mode(mode).build(encoder, config.options, seed=config.seed)
    train(adapter, head, RandomImages(), config, device=torch.device("cpu"), precision="fp32")
    return adapter


def test_registry_has_every_mode():
    assert set(MODES) == set(Mode)
    for mode in Mode:
        assert get_mode(mode.value).name is mode
    assert {m for m in Mode if get_mode(m).linearized} == {Mode.LINEAR, Mode.LLORA_NET}
    with pytest.raises(UsageError, match="unknown fine-tuning mode"):
        get_mode("everything")


def test_attention_parameters_are_found_by_module_type(base_model):
    names = attention_parameter_names(base_model.visual)
    assert sorted(names) == sorted(
        f"transformer.resblocks.{i}.attn.{n}" for i in range(3)
        for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"))
    with pytest.raises(InvalidInputError, match="MultiheadAttention"):
        attention_parameter_names(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_an_attention_pooler_is_not_a_block():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.pool = nn.Module()
            self.pool.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    encoder = Encoder()
    names = attention_parameter_names(encoder)
    assert names and all(n.startswith("blocks.") for n in names)
    assert lora_targets(encoder, ("attn", "mlp")) == [
        *(f"blocks.{i}.attn.{n}" for i in (0, 1)
          for n in ("in_proj_weight.q", "in_proj_weight.k", "in_proj_weight.v",
                    "out_proj.weight")),
        "blocks.0.mlp.0.weight", "blocks.0.mlp.2.weight",
        "blocks.1.mlp.0.weight", "blocks.1.mlp.2.weight"]


def test_attn_mode_changes_only_attention_tensors(base_model, head):
    before = {n: p.detach().clone() for n, p in base_model.visual.named_parameters()}
    adapter = _trained("attn", base_model, head)
    attention = set(attention_parameter_names(base_model.visual))
    changed = {n for n, p in adapter.encoder.named_parameters() if not torch.equal(p, before[n])}
    assert changed == attention
    vector = adapter.task_vector()
    assert set(vector) == {"visual." + n for n in attention}
    for name, delta in vector.items():
        current = dict(adapter.encoder.named_parameters())[name[len("visual."):]]
        torch.testing.assert_close(delta, current.detach() - before[name[len("visual."):]],
                                   rtol=0, atol=0)


def test_full_mode_never_changes_head_or_text_tower(base_model, head, tmp_path):
    from safetensors.torch import load_file

    from tvtool.io import open_tensors

    head_before = head.clone()
    output, checkpoint = tmp_path / "tv.safetensors", tmp_path / "ft.safetensors"
    config = _config("full", output=str(output), checkpoint_out=str(checkpoint))
    finetune(config, dataset=RandomImages(), head=head)
    assert torch.equal(head, head_before)
    vector, tuned = load_file(str(output)), load_file(str(checkpoint))
    base = base_model.state_dict()
    assert set(vector) == {k for k, v in base.items()
                           if k.startswith("visual.") and v.is_floating_point()}
    assert set(tuned) == set(base)
    for name, tensor in base.items():
        if name.startswith("visual."):
            torch.testing.assert_close(tuned[name], tensor + vector[name], rtol=0, atol=1e-7)
        else:
            assert torch.equal(tuned[name], tensor), name
    assert any(v.abs().max() > 0 for v in vector.values())
    source = open_tensors(str(output))
    meta = FileMeta.from_header(source.metadata, "tv")
    source.close()
    assert meta.kind is Kind.TASK_VECTOR and meta.mode is Mode.FULL and not meta.linearized
    assert meta.architecture == "tvtool-tiny" and meta.base_ref == BASE
    assert meta.base_fingerprint and meta.base_fingerprint.startswith("sha256:")
    assert meta.dataset == "random" and meta.provenance["command"] == "finetune"


def test_linear_mode_vector_is_the_delta_and_marked_linearized(base_model, head, tmp_path):
    from tvtool.io import open_tensors
    from tvtool.models import base_source, fingerprint

    output = tmp_path / "lin.safetensors"
    seen = {}
    finetune(_config("linear", output=str(output)), dataset=RandomImages(), head=head,
             on_trained=lambda adapter: seen.update(adapter=adapter))
    source = open_tensors(str(output))
    meta = FileMeta.from_header(source.metadata, "lin")
    vector = {k: source.get(k) for k in list(source.keys())}
    source.close()
    assert meta.mode is Mode.LINEAR and meta.linearized
    base, _ = base_source(BASE)
    assert meta.base_fingerprint == fingerprint(base)
    base.close()
    adapter = seen["adapter"]
    assert torch.equal(adapter.encoder.proj, base_model.visual.proj)  # θ0 never moves
    delta = {k[len("visual."):]: v for k, v in vector.items()}
    x = RandomImages(4, seed=5).images
    with torch.no_grad():
        expected = linearized_forward(base_model.visual, None, delta, x)
        torch.testing.assert_close(adapter(x), expected)


def test_linear_mode_refuses_checkpoint_out():
    with pytest.raises(UsageError, match="checkpoint-out"):
        _config("linear", checkpoint_out="ft.safetensors")


@pytest.mark.parametrize(("targets", "expected"), [
    (("q", "v"), ["attn.in_proj_weight.q", "attn.in_proj_weight.v"]),
    (("v", "q", "q"), ["attn.in_proj_weight.q", "attn.in_proj_weight.v"]),
    (("k", "o"), ["attn.in_proj_weight.k", "attn.out_proj.weight"]),
    (("mlp",), ["mlp.c_fc.weight", "mlp.c_proj.weight"]),
    (("attn",), ["attn.in_proj_weight.q", "attn.in_proj_weight.k", "attn.in_proj_weight.v",
                 "attn.out_proj.weight"]),
])
def test_lora_targets_are_found_by_structure(base_model, targets, expected):
    names = lora_targets(base_model.visual, targets)
    assert names == [f"transformer.resblocks.{i}.{n}" for i in range(3) for n in expected]
    with pytest.raises(UsageError, match="unknown LoRA targets"):
        lora_targets(base_model.visual, ("qkv",))
    with pytest.raises(UsageError, match="no LoRA targets"):
        lora_targets(base_model.visual, ())


def test_default_lora_targets_are_the_papers_q_and_v():
    assert LoraOptions().lora_targets == ("q", "v")
    assert _config("lora").options.lora_targets == ("q", "v")
    assert _config("lora", lora_targets=("mlp", "attn")).options.lora_targets == \
        ("q", "k", "v", "o", "mlp")
    with pytest.raises(UsageError, match="unknown LoRA targets"):
        _config("lora", lora_targets=("in_proj",))


def test_lora_starts_at_base_and_never_writes_the_base(base_model, head):
    options = LoraOptions(lora_rank=4, lora_alpha=8.0, lora_targets=("attn", "mlp"))
    fresh = get_mode("lora").build(copy.deepcopy(base_model.visual), options)
    x = RandomImages(4, seed=6).images
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), base_model.visual(x), rtol=0, atol=0)
    adapter = _trained("lora", base_model, head, lora_targets=("attn", "mlp"))
    for name, param in adapter.encoder.named_parameters():
        assert torch.equal(param, dict(base_model.visual.named_parameters())[name]), name
    vector = adapter.task_vector()
    assert len(vector) == 36 and all(k.endswith((".lora_A", ".lora_B")) for k in vector)
    metadata = {f"tvtool.{k}": v for k, v in adapter.vector_metadata().items()}
    assert metadata["tvtool.lora_targets"] == "q,k,v,o,mlp"
    dense = materialize_lora(vector, metadata)
    attn = "visual.transformer.resblocks.1.attn"
    assert set(dense) == {f"visual.transformer.resblocks.{i}.{n}" for i in range(3)
                          for n in ("attn.in_proj_weight", "attn.out_proj.weight",
                                    "mlp.c_fc.weight", "mlp.c_proj.weight")}
    blocks = []
    for kind in "qkv":
        a, b = vector[f"{attn}.in_proj_weight.{kind}.lora_A"], \
            vector[f"{attn}.in_proj_weight.{kind}.lora_B"]
        assert a.shape == (4, 64) and b.shape == (64, 4)
        blocks.append(2.0 * b.double() @ a.double())
    torch.testing.assert_close(dense[f"{attn}.in_proj_weight"].double(), torch.cat(blocks))
    # θ0 + dense delta is exactly the model LoRA trained.
    params = {n: p + dense.get("visual." + n, 0) for n, p in base_model.visual.named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(functional_call(base_model.visual, params, (x,)), adapter(x),
                                   rtol=1e-5, atol=1e-6)


def test_lora_q_v_leaves_the_key_rows_and_out_projection_alone(base_model, head):
    adapter = _trained("lora", base_model, head, lr=1e-2)
    vector = adapter.task_vector()
    assert {k.rsplit(".", 2)[-2] for k in vector} == {"q", "v"}
    dense = materialize_lora(vector, adapter.vector_metadata())
    for i in range(3):
        delta = dense[f"visual.transformer.resblocks.{i}.attn.in_proj_weight"]
        assert delta.shape == (192, 64)
        assert delta[64:128].abs().max() == 0  # k rows
        assert delta[:64].abs().max() > 0 and delta[128:].abs().max() > 0
    assert not any("out_proj" in k or "mlp" in k for k in dense)


class _RefAttention(nn.Module):
    """Multi-head attention written out, each projection a given function (the reference)."""

    def __init__(self, mha: nn.MultiheadAttention, projections: dict) -> None:
        super().__init__()
        self.heads, self.batch_first = mha.num_heads, mha.batch_first
        self.projections = projections

    def forward(self, q_x, k_x, v_x, need_weights=False, attn_mask=None):
        assert q_x is k_x is v_x and attn_mask is None  # a ViT image tower
        x = q_x if self.batch_first else q_x.transpose(0, 1)
        batch, length, width = x.shape
        size = width // self.heads

        def heads(t):
            return t.reshape(batch, length, self.heads, size).transpose(1, 2)

        q, k, v = (heads(self.projections[p](x)) for p in "qkv")
        weights = torch.softmax(q @ k.transpose(-1, -2) / size ** 0.5, dim=-1)
        out = self.projections["o"]((weights @ v).transpose(1, 2).reshape(batch, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


class _RefLayer(nn.Module):
    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def _taylor_lora_layer(weight, bias, scale, factors):
    """x -> first-order Taylor expansion in (A, B) of F.linear(x, W0 + s·B·A, b) at (A0, B0)."""
    if factors is None:
        return lambda x: nn.functional.linear(x, weight, bias)
    (a0, b0), (a, b) = factors

    def layer(x):
        out, tangent = jvp(lambda a_, b_: nn.functional.linear(x, weight + scale * b_ @ a_, bias),
                           (a0, b0), (a - a0, b - b0))
        return out + tangent

    return layer


def _per_layer_llora_reference(visual, factors, scale):
    """The encoder with every adapted layer replaced by its own Taylor expansion (peta-style).

    ``factors``: full state-dict target name -> ((A0, B0), (A, B)).
    """
    model = copy.deepcopy(visual)
    for i, block in enumerate(model.transformer.resblocks):
        prefix = f"visual.transformer.resblocks.{i}"
        mha = block.attn
        width = mha.embed_dim
        weight, bias = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
        projections = {kind: _taylor_lora_layer(
            weight[j * width:(j + 1) * width], bias[j * width:(j + 1) * width], scale,
            factors.get(f"{prefix}.attn.in_proj_weight.{kind}")) for j, kind in enumerate("qkv")}
        projections["o"] = _taylor_lora_layer(mha.out_proj.weight.detach(),
                                              mha.out_proj.bias.detach(), scale,
                                              factors.get(f"{prefix}.attn.out_proj.weight"))
        block.attn = _RefAttention(mha, projections)
        for name in ("c_fc", "c_proj"):
            linear = getattr(block.mlp, name)
            setattr(block.mlp, name, _RefLayer(_taylor_lora_layer(
                linear.weight.detach(), linear.bias.detach(), scale,
                factors.get(f"{prefix}.mlp.{name}.weight"))))
    return model


@pytest.mark.parametrize("targets", [("q", "v"), ("k", "o", "mlp")])
def test_llora_is_each_lora_layer_linearized_around_its_initial_factors(base_model, targets):
    """Published L-LoRA: a Taylor expansion per adapted layer, the network stays nonlinear."""
    options = LoraOptions(lora_rank=2, lora_alpha=6.0, lora_targets=targets)
    adapter = get_mode("llora").build(copy.deepcopy(base_model.visual).double(), options,
                                      seed=3)
    assert not adapter.linearized and adapter.mode is Mode.LLORA
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for b in adapter.lora_b:  # a "trained" B
            b.copy_(0.3 * torch.randn(b.shape, generator=gen, dtype=torch.float64))
    vector = adapter.task_vector()
    scale = 6.0 / 2
    factors = {}
    for key in vector:
        if key.endswith(".lora_A"):
            target = key[: -len(".lora_A")]
            a0, b = vector[key], vector[target + ".lora_B"]
            # A moved away from A0: at B0 = 0 the expansion must not depend on it.
            a = a0 + torch.randn(a0.shape, generator=gen, dtype=torch.float64)
            factors[target] = ((a0, torch.zeros_like(b)), (a, b))
    assert len(factors) == 3 * len(targets) + (3 if "mlp" in targets else 0)
    reference = _per_layer_llora_reference(copy.deepcopy(base_model.visual).double(), factors,
                                           scale)
    x = RandomImages(3, seed=7).images.double()
    with torch.no_grad():
        expected = reference(x)
        got = adapter(x)
        base_out = copy.deepcopy(base_model.visual).double()(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert (got - base_out).abs().max() > 1e-3
    # The network-level variant is a different model.
    net = get_mode("llora-net").build(copy.deepcopy(base_model.visual).double(), options)
    with torch.no_grad():
        for mine, theirs in zip(net.lora_b, adapter.lora_b, strict=True):
            mine.copy_(theirs)
        assert (net(x) - got).abs().max() > 1e-6
    assert [n for n, _ in adapter.trainable()] == [t + ".lora_B" for t in adapter.targets]


def test_llora_net_is_the_lora_model_linearized_in_its_factors(base_model, head):
    """f(x;θ0,φ0) + J_φ·(φ − φ0) with B0 = 0 equals f(x;θ0) + J_W·(s·ΔB·A0); ΔA has no effect."""
    adapter = _trained("llora-net", base_model, head, lr=1e-2)
    scale = adapter.scaling
    vis = copy.deepcopy(base_model.visual).double()
    theta0 = {n: p.detach() for n, p in vis.named_parameters()}
    targets = adapter.targets
    a0 = [adapter.lora_a_factor(i).detach().double() for i in range(len(targets))]
    b = [p.detach().double() for p in adapter.lora_b]
    assert any(t.abs().max() > 0 for t in b)
    x = RandomImages(3, seed=7).images.double()
    width = 64

    def lora_model(a_list, b_list):
        params = dict(theta0)
        for t, a_t, b_t in zip(targets, a_list, b_list, strict=True):
            weight, _, kind = t.rpartition(".")
            rows = slice("qkv".index(kind) * width, ("qkv".index(kind) + 1) * width)
            delta = torch.zeros_like(theta0[weight])
            delta[rows] = scale * b_t @ a_t
            params[weight] = params[weight] + delta
        return functional_call(vis, params, (x,))

    zeros_b = [torch.zeros_like(t) for t in b]
    random_da = [torch.randn_like(t) for t in a0]
    from tvtool.linearize.generic import forward_ad_safe_attention

    with forward_ad_safe_attention():
        f0, first_order = jvp(lora_model, (a0, zeros_b), (random_da, b))
        _, from_a_only = jvp(lora_model, (a0, zeros_b), (random_da, zeros_b))
    # A moves nothing at first order when B0 = 0, which is why tvtool freezes A.
    assert from_a_only.abs().max() == 0
    adapter.double()
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), f0 + first_order, rtol=1e-9, atol=1e-10)
        dense = materialize_lora(adapter.task_vector(), adapter.vector_metadata())
        delta = {k[len("visual."):]: v for k, v in dense.items()}
        torch.testing.assert_close(jvp_reference(vis, None, delta, x), f0 + first_order,
                                   rtol=1e-9, atol=1e-10)
    assert [n for n, _ in adapter.trainable()] == [t + ".lora_B" for t in targets]


def test_llora_net_gradient_to_a_is_zero_at_peft_init(base_model):
    """The reason A is frozen: with B0 = 0, the linearized output has zero gradient in ΔA."""
    from tvtool.linearize.generic import forward_ad_safe_attention

    adapter = get_mode("llora-net").build(copy.deepcopy(base_model.visual),
                                          LoraOptions(lora_rank=2, lora_alpha=4.0,
                                                      lora_targets=("o", "mlp")))
    vis, scale, targets = adapter.encoder, adapter.scaling, adapter.targets
    theta0 = {n: p.detach() for n, p in vis.named_parameters()}
    a0 = [adapter.lora_a_factor(i) for i in range(len(targets))]
    b0 = [torch.zeros_like(p) for p in adapter.lora_b]
    x = RandomImages(2).images

    def lora_model(a_list, b_list):
        params = dict(theta0)
        for t, a_t, b_t in zip(targets, a_list, b_list, strict=True):
            params[t] = theta0[t] + scale * b_t @ a_t
        return functional_call(vis, params, (x,))

    da = [torch.zeros_like(a).requires_grad_() for a in a0]
    db = [torch.randn_like(b).requires_grad_() for b in b0]
    with forward_ad_safe_attention():
        _, tangent = jvp(lora_model, (a0, b0), (da, db))
    tangent.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().max() == 0 for t in da)
    assert all(t.grad is not None and t.grad.abs().max() > 0 for t in db)


def test_materialize_lora_validates_its_input():
    a, b = torch.ones(2, 3), torch.ones(5, 2)
    good = {"w.lora_A": a, "w.lora_B": b, "bias": torch.ones(5)}
    out = materialize_lora(good, {"tvtool.lora_alpha": "4.0", "tvtool.lora_rank": "2"})
    torch.testing.assert_close(out["w"], 2.0 * b @ a)
    assert torch.equal(out["bias"], torch.ones(5))
    meta = FileMeta(kind=Kind.TASK_VECTOR, mode=Mode.LORA, extra={"lora_alpha": "4"})
    torch.testing.assert_close(materialize_lora(good, meta)["w"], 2.0 * b @ a)
    assert materialize_lora({"x": a}, {}) == {"x": a}
    with pytest.raises(InvalidInputError, match="lora_alpha"):
        materialize_lora(good, {})
    with pytest.raises(InvalidInputError, match="matching"):
        materialize_lora({"w.lora_A": a}, {"tvtool.lora_alpha": "1"})
    with pytest.raises(InvalidInputError, match="matching"):
        materialize_lora({"w.lora_B": b}, {"tvtool.lora_alpha": "1"})
    with pytest.raises(InvalidInputError, match="rank"):
        materialize_lora(good, {"tvtool.lora_alpha": "1", "tvtool.lora_rank": "3"})
    with pytest.raises(InvalidInputError, match="do not fit"):
        materialize_lora({"w.lora_A": a, "w.lora_B": torch.ones(5, 3)},
                         {"tvtool.lora_alpha": "1"})


@pytest.mark.parametrize(("values", "message"), [
    ({"lora_rank": 0}, "--lora-rank"),
    ({"lora_rank": 2.5}, "--lora-rank"),
    ({"lora_alpha": -1}, "--lora-alpha"),
    ({"lora_alpha": float("nan")}, "--lora-alpha"),
    ({"lora_targets": ","}, "--lora-targets is empty"),
    ({"lora_targets": "q,qkv"}, "unknown LoRA targets"),
])
def test_lora_options_are_checked_on_construction(values, message):
    with pytest.raises(UsageError, match=message):
        LoraOptions(**values)
    for mode in ("lora", "llora", "llora-net"):  # the config builds them the same way
        with pytest.raises(UsageError, match=message):
            _config(mode, **values)


def test_mode_options_belong_to_their_mode():
    # The flag form (a comma-separated string) and a tuple give the same options.
    assert LoraOptions(lora_targets="v, q").lora_targets == ("q", "v")
    # Another mode's options are ignored by the flat builder (as --lora-rank with full) ...
    assert _config("full", lora_rank=0).options == NoOptions()
    # ... but a config holding the wrong mode's options object, or unknown keys, is refused.
    with pytest.raises(UsageError, match="takes LoraOptions"):
        FinetuneConfig(base=BASE, dataset="random", output="x", mode="lora",
                       options=NoOptions())
    with pytest.raises(UsageError, match="no option"):
        FinetuneConfig(base=BASE, dataset="random", output="x", mode="full",
                       options={"lora_rank": 4})
    with pytest.raises(UsageError, match="unknown fine-tuning setting"):
        _config("full", lora_rnak=4)
    config = FinetuneConfig(base=BASE, dataset="random", output="x", mode="llora",
                            options={"lora_rank": 4, "lora_targets": ["mlp"]})
    assert config.options == LoraOptions(lora_rank=4, lora_targets=("mlp",))
    assert config.as_json()["lora_targets"] == ["mlp"] and "options" not in config.as_json()


def test_every_mode_declares_its_options_and_flags():
    for mode in MODES.values():
        assert dataclasses.is_dataclass(mode.options)
        defaults = mode.options()  # every field has a default, and the defaults are valid
        names = {f.name for f in dataclasses.fields(defaults)}
        assert {option.field for option in mode.cli_options} == names, mode.name
        assert all(option.flag.startswith("--") and option.help for option in mode.cli_options)
