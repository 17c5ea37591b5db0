"""tangent_task_arithmetic linearized checkpoints -> `linear` task vectors (`convert --base`).

The fixture is written the way the reference code writes it: `LinearizedImageEncoder.save`
stores `state_dict()` of a module whose `model` holds two `nn.ParameterList`s built from the
parameters of an `ImageEncoder` (the open_clip model with its text transformer deleted), plus
`model_name`. The classes below carry the reference's module and qualified names.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.conftest import TINY, load


class ImageEncoder(nn.Module):
    """The reference's ImageEncoder: an open_clip model without its text transformer."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        import open_clip

        import tvtool.models  # noqa: F401  (registers the tiny config)

        super().__init__()
        self.model = open_clip.create_model(TINY)
        self.model.load_state_dict(state)
        delattr(self.model, "transformer")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


ImageEncoder.__module__ = "src.modeling"


class LinearizedModel(nn.Module):
    def __init__(self, model: nn.Module, init_model: nn.Module) -> None:
        super().__init__()
        # make_functional_with_buffers lists parameters() in order, once each.
        self.params = nn.ParameterList([p.detach().clone() for p in model.parameters()])
        self.params0 = nn.ParameterList([p.detach().clone() for p in init_model.parameters()])


class LinearizedImageEncoder(nn.Module):
    def __init__(self, image_encoder: nn.Module, init_encoder: nn.Module) -> None:
        super().__init__()
        self.model = LinearizedModel(model=image_encoder, init_model=init_encoder)

    def save(self, filename: str, model_name: str) -> None:
        state_dict = self.state_dict()
        state_dict["model_name"] = model_name
        torch.save(state_dict, filename)


for _cls in (LinearizedModel, LinearizedImageEncoder):
    _cls.__module__ = "src.linearize"


def _finetuned(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in state.items():
        moved = name.startswith("visual.") or name == "ln_final.weight"
        out[name] = value + 0.02 * torch.randn(value.shape, generator=gen) if moved \
            and value.is_floating_point() else value.clone()
    return out


@pytest.fixture(scope="module")
def linearized(files, tmp_path_factory):
    base = load(files["base"])
    init, tuned = ImageEncoder(base), ImageEncoder(_finetuned(base, 11))
    path = tmp_path_factory.mktemp("tangent") / "linear_finetuned.pt"
    LinearizedImageEncoder(tuned, init).save(str(path), TINY)
    return {"path": str(path), "init": init, "tuned": tuned}


def test_fixture_has_the_reference_layout(linearized):
    from tvtool.io import read_pickled_dict

    entries = read_pickled_dict(linearized["path"])
    count = sum(1 for _ in linearized["init"].parameters())
    assert entries["model_name"] == TINY
    assert set(entries) == {"model_name"} | {f"model.params.{i}" for i in range(count)} \
        | {f"model.params0.{i}" for i in range(count)}


def test_convert_gives_the_linear_vector(cli, tmp_path, files, linearized):
    out = tmp_path / "tv.safetensors"
    result = cli(["convert", linearized["path"], "--base", files["base"], "-d", "MNIST",
                  "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["details"] == {"architecture": TINY, "mode": "linear"}
    assert "ln_final.weight" in result.stderr and "moved" in result.stderr
    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert meta["tvtool.kind"] == "task_vector" and meta["tvtool.mode"] == "linear"
    assert meta["tvtool.linearized"] == "true" and meta["tvtool.dataset"] == "MNIST"
    vector = load(str(out))
    init = dict(linearized["init"].named_parameters())
    tuned = dict(linearized["tuned"].named_parameters())
    expected = {n.removeprefix("model."): tuned[n] - init[n] for n in init
                if n.startswith("model.visual.")}
    assert vector.keys() == expected.keys()
    for name, delta in expected.items():
        torch.testing.assert_close(vector[name], delta.detach(), rtol=0, atol=1e-7)


def test_converted_vector_evaluates_as_the_reference_linearized_model(tmp_path, files,
                                                                      linearized):
    from tvtool.commands.convert import ConvertConfig
    from tvtool.commands.convert import convert as run_convert
    from tvtool.evaluate import clear_memory_cache, open_eval_model

    out = tmp_path / "tv.safetensors"
    run_convert(ConvertConfig(input=linearized["path"], output=str(out),
                                                base=files["base"]))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    encoder = linearized["init"].eval()
    params0 = {n: p.detach() for n, p in encoder.named_parameters()}
    tuned = {n: p.detach() for n, p in linearized["tuned"].named_parameters()}
    dparams = {n: tuned[n] - params0[n] for n in params0}
    # The reference's LinearizedModel.__call__: f(x; p0) + jvp along (p - p0), every parameter.
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            out0, tangent = jvp(lambda p: functional_call(encoder, p, (x,)), (params0,),
                                (dparams,))
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    expected = F.normalize(out0 + tangent, dim=-1)
    clear_memory_cache()
    with open_eval_model(files["base"], [str(out)]) as model:
        assert model.linearized
        model.set_coefficients([1.0])
        got = model.image_features(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_bad_linearized_inputs(cli, tmp_path, files, linearized, tiny_state):
    out = tmp_path / "out.safetensors"
    plain = cli(["convert", linearized["path"], "-o", str(out)])
    assert plain.exit_code == 2 and "--base" in plain.stderr
    # Linearized at other weights than the base: J would be taken at the wrong point.
    other = cli(["convert", linearized["path"], "--base", TINY, "-o", str(out)])
    assert other.exit_code == 2 and "linearized at other weights" in other.stderr
    assert not out.exists()
    # Another architecture recorded in the file.
    entries = torch.load(linearized["path"], weights_only=True)
    entries["model_name"] = "ViT-B-32"
    wrong = tmp_path / "wrong.pt"
    torch.save(entries, wrong)
    named = cli(["convert", str(wrong), "--base", files["base"], "-o", str(out)])
    assert named.exit_code == 2 and "ViT-B-32" in named.stderr
    # A parameter missing.
    entries["model_name"] = TINY
    del entries["model.params.3"]
    torch.save(entries, wrong)
    short = cli(["convert", str(wrong), "--base", files["base"], "-o", str(out)])
    assert short.exit_code == 2 and "model.params entries" in short.stderr
    # An ordinary checkpoint with --base.
    state = tmp_path / "state.pt"
    torch.save(tiny_state, state)
    not_linear = cli(["convert", str(state), "--base", files["base"], "-o", str(out)])
    assert not_linear.exit_code == 2 and "not a tangent_task_arithmetic" in not_linear.stderr


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))

    marker = ""


def test_globals_in_a_linearized_file_stay_inert(cli, tmp_path, files, linearized):
    marker = tmp_path / "ran"
    _Evil.marker = str(marker)
    entries = torch.load(linearized["path"], weights_only=True)
    entries["model_name"] = _Evil()
    evil = tmp_path / "evil.pt"
    torch.save(entries, evil)
    result = cli(["convert", str(evil), "--base", files["base"], "-o",
                  str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2 and "neither a tensor nor a plain value" in result.stderr
    assert not marker.exists()
