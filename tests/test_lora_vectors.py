"""LoRA vector files: negate, apply, merge coefficients, both factor layouts, legacy L-LoRA.

Every expected value is computed here from the stored factors (W0 + c·(alpha/r)·B·A, with the
q/k/v row blocks of the fused in-projection stacked by hand), never by tvtool's materialiser.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY, load, reference_lora_dense
from tvtool.io import open_tensors, write_tensors
from tvtool.metadata import FileMeta, Kind, Mode

ALPHA, RANK = 6.0, 2
SCALE = ALPHA / RANK
ATTN = "visual.transformer.resblocks.{}.attn"
WIDTH = 64


def _factors(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random factors in the current (q/v row blocks, mlp) or the older (in_proj, out_proj)
    layout of the tiny model."""
    gen = torch.Generator().manual_seed(seed)

    def pair(stem: str, rows: int, cols: int) -> dict[str, torch.Tensor]:
        return {f"{stem}.lora_A": torch.randn(RANK, cols, generator=gen),
                f"{stem}.lora_B": 0.1 * torch.randn(rows, RANK, generator=gen)}

    out: dict[str, torch.Tensor] = {}
    for i in range(3):
        if layout == "blocks":
            out |= pair(f"{ATTN.format(i)}.in_proj_weight.q", WIDTH, WIDTH)
            out |= pair(f"{ATTN.format(i)}.in_proj_weight.v", WIDTH, WIDTH)
            out |= pair(f"visual.transformer.resblocks.{i}.mlp.c_fc.weight", 4 * WIDTH, WIDTH)
        else:
            out |= pair(f"{ATTN.format(i)}.in_proj_weight", 3 * WIDTH, WIDTH)
            out |= pair(f"{ATTN.format(i)}.out_proj.weight", WIDTH, WIDTH)
    return out


def _dense(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return reference_lora_dense(factors, ALPHA, WIDTH)

def _write(path, tensors, mode: Mode, linearized: bool, fingerprint: str | None) -> str:
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY, base_fingerprint=fingerprint,
                    mode=mode, linearized=linearized, dataset="lora",
                    extra={"lora_alpha": str(ALPHA), "lora_rank": str(RANK),
                           "lora_targets": "q,v,mlp"})
    write_tensors(str(path), tensors, meta.to_header())
    return str(path)


@pytest.fixture(scope="module")
def base_fp(files) -> str:
    from tvtool.models import base_source, fingerprint

    source, _ = base_source(files["base"])
    try:
        return fingerprint(source)
    finally:
        source.close()


@pytest.mark.parametrize(("layout", "mode", "coef"), [
    ("blocks", Mode.LORA, 1.0), ("whole", Mode.LORA, 0.4),
    ("blocks", Mode.LLORA, 0.4), ("whole", Mode.LLORA, 1.0)])
def test_negate_scales_the_dense_change_by_minus_c(cli, tmp_path, base_fp, layout, mode, coef):
    factors = _factors(layout)
    vector = _write(tmp_path / "v.safetensors", factors, mode, False, base_fp)
    out = tmp_path / "neg.safetensors"
    result = cli(["negate", vector, "--coef", str(coef), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    negated = load(str(out))
    assert negated.keys() == factors.keys()
    expected, got = _dense(factors), _dense(negated)
    assert expected.keys() == got.keys()
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], -coef * delta, rtol=1e-6, atol=1e-7)
    source = open_tensors(str(out))
    meta = FileMeta.from_header(source.metadata, "neg")
    source.close()
    assert meta.mode is mode and not meta.linearized


@pytest.mark.parametrize("layout", ["blocks", "whole"])
def test_apply_adds_c_times_s_b_a_to_the_base(cli, files, tmp_path, base_fp, layout):
    factors = _factors(layout, seed=1)
    vector = _write(tmp_path / "v.safetensors", factors, Mode.LORA, False, base_fp)
    out = tmp_path / "ckpt.safetensors"
    result = cli(["apply", "--base", files["base"], vector, "--coef", "-0.7", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    base, applied = load(files["base"]), load(str(out))
    dense = _dense(factors)
    assert applied.keys() == base.keys()
    for name, tensor in base.items():
        expected = (tensor.double() - 0.7 * dense[name]).float() if name in dense else tensor
        torch.testing.assert_close(applied[name], expected, rtol=0, atol=1e-6)


def test_negated_lora_applies_as_base_minus_delta(cli, files, tmp_path, base_fp):
    """The issue's failing case: negate with C = 1, then apply, must subtract the task."""
    factors = _factors("blocks", seed=2)
    vector = _write(tmp_path / "v.safetensors", factors, Mode.LLORA, False, base_fp)
    negated, out = tmp_path / "neg.safetensors", tmp_path / "ckpt.safetensors"
    assert cli(["negate", vector, "-o", str(negated)]).exit_code == 0
    result = cli(["apply", "--base", files["base"], str(negated), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    base, applied, dense = load(files["base"]), load(str(out)), _dense(factors)
    for name, delta in dense.items():
        torch.testing.assert_close(applied[name], (base[name].double() - delta).float(),
                                   rtol=0, atol=1e-6)


def test_merge_coefficients_scale_the_dense_change_once(cli, tmp_path, base_fp):
    factors = _factors("blocks", seed=3)
    vector = _write(tmp_path / "v.safetensors", factors, Mode.LORA, False, base_fp)
    out = tmp_path / "m.safetensors"
    result = cli(["merge", vector, "--coef", "-0.5", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    merged = load(str(out))
    for name, delta in _dense(factors).items():
        torch.testing.assert_close(merged[name].double(), -0.5 * delta, rtol=1e-6, atol=1e-7)


def test_legacy_llora_vector_is_read_as_llora_net(cli, files, tmp_path, base_fp, capsys):
    """`llora` vectors of older tvtool (linearized=true) are the network-level variant."""
    from tvtool.vectors import open_vector_meta

    factors = _factors("whole", seed=4)
    vector = _write(tmp_path / "legacy-llora.safetensors", factors, Mode.LLORA, True, base_fp)
    source = open_tensors(vector)
    meta = open_vector_meta(source, source.label)
    source.close()
    assert meta.mode is Mode.LLORA_NET and meta.linearized
    noted = capsys.readouterr().err.strip().splitlines()
    assert len(noted) == 1 and "llora-net" in noted[0] and "legacy-llora" in noted[0]
    # Still a linearized vector: apply needs --approximate-linearized ...
    out = tmp_path / "ckpt.safetensors"
    refused = cli(["apply", "--base", files["base"], vector, "-o", str(out)])
    assert refused.exit_code == 2 and "linearized" in refused.stderr and not out.exists()
    # ... and negate keeps it linearized, recorded under its new name.
    negated = tmp_path / "neg.safetensors"
    assert cli(["negate", vector, "-o", str(negated)]).exit_code == 0
    source = open_tensors(str(negated))
    meta = FileMeta.from_header(source.metadata, "neg")
    source.close()
    assert meta.mode is Mode.LLORA_NET and meta.linearized
    for name, delta in _dense(factors).items():
        torch.testing.assert_close(_dense(load(str(negated)))[name], -delta)


def test_mixed_factor_layouts_of_one_weight_are_refused(cli, files, tmp_path, base_fp):
    factors = _factors("blocks") | _factors("whole")
    vector = _write(tmp_path / "v.safetensors", factors, Mode.LORA, False, base_fp)
    out = tmp_path / "ckpt.safetensors"
    result = cli(["apply", "--base", files["base"], vector, "-o", str(out)])
    assert result.exit_code == 2 and "both for the whole matrix" in result.stderr
    assert not out.exists()


def test_pure_vector_algebra_refuses_lora_factors():
    from tvtool.errors import InvalidInputError
    from tvtool.vectors import add, negate, scale

    factors = _factors("blocks")
    for call in (lambda: scale(factors, 2.0), lambda: negate(factors),
                 lambda: add([factors, factors])):
        with pytest.raises(InvalidInputError, match="LoRA vector"):
            call()


def test_inspect_reports_norms_and_cosine_of_the_dense_change(tmp_path, base_fp):
    from tvtool.commands.inspect import InspectConfig
    from tvtool.commands.inspect import inspect as run_inspect

    first, second = _factors("blocks", seed=5), _factors("blocks", seed=6)
    # Same A (as two runs with one seed have), different B: the factor cosine would be high.
    second = {k: (first[k] if k.endswith(".lora_A") else v) for k, v in second.items()}
    paths = tuple(_write(tmp_path / f"{n}.safetensors", f, Mode.LORA, False, base_fp)
                  for n, f in (("a", first), ("b", second)))
    report = run_inspect(InspectConfig(files=paths))
    dense = [_dense(first), _dense(second)]
    flat = [torch.cat([d[k].reshape(-1) for k in sorted(d)]) for d in dense]
    for entry, vector in zip(report["files"], flat, strict=True):
        assert entry["norm"] == pytest.approx(float(vector.norm()), rel=1e-6)
        assert entry["tensors"] == 18  # the stored factors
    expected = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
    assert report["cosine"][0][1] == pytest.approx(expected, abs=1e-6)
    assert abs(expected) < 0.5


def test_open_vector_reads_lora_factors_as_dense_deltas(tmp_path):
    # The one opener merge, apply and eval share: dense deltas, checked metadata, the stored
    # factors kept for what must describe the file itself (the model card's fingerprint).
    from tvtool.errors import InvalidInputError
    from tvtool.vectors import open_vector

    factors = _factors("blocks")
    path = _write(tmp_path / "lora.safetensors", factors, Mode.LORA, False, None)
    vector = open_vector(path)
    try:
        assert vector.meta.mode is Mode.LORA and vector.stored is not None
        assert sorted(vector.stored.keys()) == sorted(factors)
        expected = _dense(factors)
        assert sorted(vector.source.keys()) == sorted(expected)
        for name, delta in expected.items():
            torch.testing.assert_close(vector.source.get(name), delta.float())
    finally:
        vector.source.close()
    dense = {"visual.proj": torch.ones(2)}
    plain = _write(tmp_path / "dense.safetensors", dense, Mode.FULL, False, None)
    opened = open_vector(plain)
    assert opened.stored is None and opened.source.keys() == ["visual.proj"]
    opened.source.close()
    checkpoint = tmp_path / "ckpt.safetensors"
    write_tensors(str(checkpoint), dense, FileMeta(kind=Kind.CHECKPOINT).to_header())
    with pytest.raises(InvalidInputError, match="not a task vector"):
        open_vector(str(checkpoint))
