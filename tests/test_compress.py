"""`tvtool compress` (TSV-C): factors against an independent truncated SVD, the readers of the
compressed file (apply, merge, eval, inspect, negate), LoRA inputs, and bad input.

Expected values are computed here with torch.linalg.svd in float64 and multiplied out by hand
(B·A), never with tvtool's materialiser or its SVD helpers.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY, load, reference_lora_dense
from tvtool.io import open_tensors, write_tensors
from tvtool.metadata import FileMeta, Kind, Mode

SHAPES = {"visual.a.weight": (40, 24), "visual.b.weight": (16, 48), "visual.c.bias": (24,),
          "visual.d.weight": (4, 3, 2, 2), "visual.e.weight": (6, 5)}


def write_vector(path, tensors, mode=Mode.FULL, linearized=False, extra=None, fingerprint=None):
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=TINY, mode=mode, linearized=linearized,
                    dataset="task", base_fingerprint=fingerprint, extra=extra or {})
    write_tensors(str(path), tensors, meta.to_header(), check_finite=False)
    return str(path)


def random_vector(seed=0, dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=gen, dtype=torch.float64)
        if len(shape) == 2:  # a decaying spectrum, as task vectors have
            u, s, vh = torch.linalg.svd(tensor, full_matrices=False)
            tensor = u @ torch.diag(s * 0.7 ** torch.arange(s.numel())) @ vh
        out[name] = (1e-2 * tensor).to(dtype)
    return out


def truncated(tensor: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(tensor.double(), full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def dense_of(path: str) -> dict[str, torch.Tensor]:
    """B·A per factored weight, other tensors as stored (float64), by hand."""
    stored = load(path)
    out = {}
    for name, tensor in stored.items():
        if name.endswith(".lora_B"):
            continue
        if name.endswith(".lora_A"):
            stem = name[: -len(".lora_A")]
            out[stem] = stored[stem + ".lora_B"].double() @ tensor.double()
        else:
            out[name] = tensor.double()
    return out


def header(path: str) -> dict[str, str]:
    source = open_tensors(path)
    try:
        return dict(source.metadata)
    finally:
        source.close()


def run(cli, *args):
    return cli(["compress", *map(str, args)])


@pytest.mark.parametrize(("flag", "value"), [("--rank", 3), ("--fraction", 0.25)])
def test_factors_equal_an_independent_truncated_svd(cli, tmp_path, flag, value):
    tensors = random_vector()
    vector = write_vector(tmp_path / "tv.safetensors", tensors)
    out = tmp_path / "c.safetensors"
    result = run(cli, vector, flag, value, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    dense = dense_of(str(out))
    assert dense.keys() == tensors.keys()
    for name, tensor in tensors.items():
        if tensor.dim() != 2:
            assert torch.equal(load(str(out))[name], tensor)  # other tensors: kept as they are
            continue
        k = value if flag == "--rank" else int(value * min(tensor.shape))
        if k * sum(tensor.shape) >= tensor.numel():  # 6x5 at rank 3: factors not smaller
            assert torch.equal(load(str(out))[name], tensor)
            continue
        torch.testing.assert_close(dense[name], truncated(tensor, k), rtol=1e-5, atol=1e-8)
        a, b = load(str(out))[name + ".lora_A"], load(str(out))[name + ".lora_B"]
        assert a.shape == (k, tensor.shape[1]) and b.shape == (tensor.shape[0], k)
        # A = Vᵀ has orthonormal rows.
        torch.testing.assert_close(a.double() @ a.double().T, torch.eye(k, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
    # The size and the energy kept, from the singular values computed here.
    stored = sum(t.numel() for t in load(str(out)).values())
    assert report["parameters"] == stored == report["details"]["parameters"]
    details = report["details"]
    total = sum(float(t.double().square().sum()) for t in tensors.values())
    error = sum(float((dense[n] - t.double()).square().sum()) for n, t in tensors.items())
    assert details["energy_kept"] == pytest.approx(1 - error / total, rel=1e-5)
    assert details["relative_error"] == pytest.approx((error / total) ** 0.5, rel=1e-3)
    assert details["size_kept"] == pytest.approx(stored / sum(t.numel() for t in
                                                              tensors.values()))
    meta = header(str(out))
    assert meta["tvtool.factors"] == "svd" and meta["tvtool.mode"] == "full"
    assert json.loads(meta["tvtool.compression"])["energy_kept"] == details["energy_kept"]


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_picks_the_smallest_rank_reaching_it(cli, tmp_path, energy):
    tensors = random_vector(seed=1)
    vector = write_vector(tmp_path / "tv.safetensors", tensors)
    out = tmp_path / "c.safetensors"
    result = run(cli, vector, "--energy", energy, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["details"]["tensors"]}
    for name, tensor in tensors.items():
        if tensor.dim() != 2:
            continue
        squares = torch.linalg.svdvals(tensor.double()).square()
        share = torch.cumsum(squares, 0) / squares.sum()
        k = next(i + 1 for i in range(squares.numel()) if share[i] >= energy - 1e-12)
        assert k == 1 or share[k - 2] < energy  # smallest
        if k * sum(tensor.shape) >= tensor.numel():
            assert rows[name]["stored"] == "dense" and rows[name]["energy"] == 1.0
        else:
            assert rows[name]["rank"] == k and rows[name]["energy"] >= energy - 1e-9
            torch.testing.assert_close(dense_of(str(out))[name], truncated(tensor, k),
                                       rtol=1e-5, atol=1e-8)


def test_zero_matrix_keeps_no_component(cli, tmp_path):
    tensors = {"visual.a.weight": torch.zeros(30, 20), "visual.b.weight": torch.ones(30, 20)}
    vector = write_vector(tmp_path / "tv.safetensors", tensors)
    out = tmp_path / "c.safetensors"
    result = run(cli, vector, "--energy", 0.9, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    stored = load(str(out))
    assert stored["visual.a.weight.lora_A"].shape == (0, 20)
    assert stored["visual.b.weight.lora_A"].shape == (1, 20)  # a rank-1 matrix
    torch.testing.assert_close(dense_of(str(out))["visual.a.weight"],
                               torch.zeros(30, 20, dtype=torch.float64))
    assert json.loads(result.stdout)["details"]["energy_kept"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def base_fp(files) -> str:
    from tvtool.models import base_source, fingerprint

    source, _ = base_source(files["base"])
    try:
        return fingerprint(source)
    finally:
        source.close()


@pytest.fixture(scope="module")
def compressed(files, tmp_path_factory):
    """tv1 of the tiny model compressed to rank 2, and the same truncation written dense."""
    from tvtool.commands.compress import CompressConfig, compress

    root = tmp_path_factory.mktemp("compressed")
    out = root / "tv1.rank2.safetensors"
    compress(CompressConfig(vector=files["tv1"], output=str(out), rank=2))
    original = load(files["tv1"])
    expected = {n: (truncated(t, 2).float() if t.dim() == 2 and 2 * sum(t.shape) < t.numel()
                    else t) for n, t in original.items()}
    source = open_tensors(files["tv1"])
    meta = FileMeta.from_header(source.metadata, "tv1")
    source.close()
    reference = root / "tv1.truncated.safetensors"
    write_tensors(str(reference), expected, meta.to_header())
    return {"compressed": str(out), "reference": str(reference), "expected": expected}


def test_apply_reads_the_compressed_vector(cli, files, compressed, tmp_path):
    got, want = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for vector, out in ((compressed["compressed"], got), (compressed["reference"], want)):
        result = cli(["apply", "--base", files["base"], vector, "--coef", "0.8", "-o", str(out)])
        assert result.exit_code == 0, result.stderr
    ours, theirs = load(str(got)), load(str(want))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=2e-6)


def test_merge_reads_the_compressed_vector(cli, files, compressed, tmp_path):
    got, want = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for vector, out in ((compressed["compressed"], got), (compressed["reference"], want)):
        result = cli(["merge", vector, files["tv2"], "-m", "tsv", "-o", str(out)])
        assert result.exit_code == 0, result.stderr
    ours, theirs = load(str(got)), load(str(want))
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-6)
    assert "tvtool.factors" not in header(str(got))  # the merge is dense


def test_inspect_and_negate_read_the_compressed_vector(cli, compressed, tmp_path):
    from tvtool.commands.inspect import InspectConfig
    from tvtool.commands.inspect import inspect as run_inspect

    report = run_inspect(InspectConfig(files=(compressed["compressed"],)))
    expected = sum(float(t.double().square().sum()) for t in compressed["expected"].values())
    assert report["files"][0]["norm"] == pytest.approx(expected ** 0.5, rel=1e-5)
    negated = tmp_path / "neg.safetensors"
    assert cli(["negate", compressed["compressed"], "-a", "0.5", "-o", str(negated)]
               ).exit_code == 0
    for name, tensor in dense_of(str(negated)).items():
        # float32 SVD of a flat (random) spectrum: subspaces to ~1e-4 relative.
        torch.testing.assert_close(tensor, -0.5 * compressed["expected"][name].double(),
                                   rtol=1e-4, atol=1e-6)


def test_eval_reads_the_compressed_vector(cli, files, compressed):
    reports = []
    for vector in (compressed["compressed"], compressed["reference"]):
        result = cli(["eval", vector, "--base", files["base"], "-d", "synthetic:shape",
                      "--limit", "16", "--device", "cpu", "--json"])
        assert result.exit_code == 0, result.stderr
        reports.append(json.loads(result.stdout)["results"][0]["accuracy"])
    assert reports[0] == reports[1]


@pytest.mark.parametrize("mode", [Mode.LORA, Mode.LLORA_NET])
def test_lora_vector_is_refactored_exactly(cli, tmp_path, base_fp, mode):
    gen = torch.Generator().manual_seed(3)
    stem = "visual.transformer.resblocks.0.attn.in_proj_weight"
    factors = {f"{stem}.q.lora_A": torch.randn(2, 64, generator=gen),
               f"{stem}.q.lora_B": 0.1 * torch.randn(64, 2, generator=gen),
               f"{stem}.v.lora_A": torch.randn(2, 64, generator=gen),
               f"{stem}.v.lora_B": 0.1 * torch.randn(64, 2, generator=gen)}
    vector = write_vector(tmp_path / "lora.safetensors", factors, mode=mode,
                          linearized=mode.linearized, fingerprint=base_fp,
                          extra={"lora_alpha": "6.0", "lora_rank": "2", "lora_targets": "q,v"})
    out = tmp_path / "c.safetensors"
    # The in-projection's ΔW (q and v blocks, rank 2 each) has rank 4: --rank 4 is exact.
    result = run(cli, vector, "--rank", 4, "-o", out)
    assert result.exit_code == 0, result.stderr
    expected = reference_lora_dense(factors, 6.0, 64)
    got = dense_of(str(out))
    torch.testing.assert_close(got[stem], expected[stem], rtol=1e-5, atol=1e-6)
    meta = header(str(out))
    assert meta["tvtool.mode"] == mode.value and meta["tvtool.factors"] == "svd"
    assert meta["tvtool.linearized"] == ("true" if mode.linearized else "false")
    assert "tvtool.lora_alpha" not in meta and meta["tvtool.lora_targets"] == "q,v"
    # Below its rank, a truncation of ΔW.
    low = tmp_path / "low.safetensors"
    assert run(cli, vector, "--rank", 1, "-o", low).exit_code == 0
    torch.testing.assert_close(dense_of(str(low))[stem], truncated(expected[stem], 1),
                               rtol=1e-4, atol=1e-6)
    # A peft adapter cannot hold per-tensor ranks without alpha: one-line refusal.
    if mode is Mode.LORA:
        refused = cli(["export-peft", str(out), "-o", str(tmp_path / "peft")])
        assert refused.exit_code == 2 and "compress" in refused.stderr
        assert refused.stderr.count("\n") <= 2 and not (tmp_path / "peft").exists()


def test_half_precision_factors_keep_the_dtype(cli, tmp_path):
    tensors = random_vector(seed=4, dtype=torch.float16)
    vector = write_vector(tmp_path / "tv.safetensors", tensors)
    out = tmp_path / "c.safetensors"
    assert run(cli, vector, "--rank", 2, "-o", out).exit_code == 0
    stored = load(str(out))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    torch.testing.assert_close(dense_of(str(out))["visual.a.weight"],
                               truncated(tensors["visual.a.weight"], 2), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    ([], "exactly one of"),
    (["--rank", "2", "--energy", "0.9"], "exactly one of"),
    (["--rank", "0"], "--rank must be"),
    (["--energy", "0"], "--energy must be"),
    (["--energy", "1.5"], "--energy must be"),
    (["--fraction", "-0.1"], "--fraction must be"),
    (["--rank", "2", "--threads", "0"], "--threads must be"),
])
def test_bad_rules_exit_2_and_write_nothing(cli, tmp_path, args, message):
    vector = write_vector(tmp_path / "tv.safetensors", random_vector())
    out = tmp_path / "c.safetensors"
    result = run(cli, vector, *args, "-o", out)
    assert result.exit_code == 2 and message in result.stderr
    assert result.stderr.count("\n") <= 2 and not out.exists()


def test_bad_inputs_exit_2_and_write_nothing(cli, files, tmp_path):
    out = tmp_path / "c.safetensors"
    # A checkpoint is not a task vector.
    result = run(cli, files["base"], "--rank", 2, "-o", out)
    assert result.exit_code == 2 and "not a task vector" in result.stderr and not out.exists()
    # NaN in a tensor: named, nothing written.
    tensors = random_vector()
    tensors["visual.b.weight"][3, 3] = float("nan")
    bad = write_vector(tmp_path / "nan.safetensors", tensors)
    result = run(cli, bad, "--rank", 2, "-o", out)
    assert result.exit_code == 2 and "visual.b.weight" in result.stderr and not out.exists()
    # The output may not overwrite the input.
    good = write_vector(tmp_path / "tv.safetensors", random_vector())
    before = (tmp_path / "tv.safetensors").read_bytes()
    result = run(cli, good, "--rank", 2, "-o", good)
    assert result.exit_code == 2 and (tmp_path / "tv.safetensors").read_bytes() == before
    # --json needs stdout free.
    result = run(cli, good, "--rank", 2, "-o", "-", "--json")
    assert result.exit_code == 2 and result.stdout == ""


def test_unknown_factor_scheme_is_refused(cli, files, tmp_path):
    vector = write_vector(tmp_path / "tv.safetensors", random_vector(),
                          extra={"factors": "tucker"})
    result = cli(["apply", "--base", files["base"], vector, "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "tvtool.factors" in result.stderr


def test_stdout_output_round_trips(cli, tmp_path):
    vector = write_vector(tmp_path / "tv.safetensors", random_vector())
    result = run(cli, vector, "--rank", 2, "-o", "-")
    assert result.exit_code == 0, result.stderr
    (tmp_path / "piped.safetensors").write_bytes(result.stdout_bytes)
    assert set(load(str(tmp_path / "piped.safetensors"))) >= {"visual.a.weight.lora_A"}


def test_rank_zero_lora_pair_is_refused_in_one_line(cli, files, tmp_path):
    # alpha/r is undefined for r = 0 (was a ZeroDivisionError); compress's rank-0 pairs carry
    # tvtool.factors=svd, which has no alpha/r scale, and are read as zero deltas.
    stem = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    factors = {f"{stem}.lora_A": torch.zeros(0, 64), f"{stem}.lora_B": torch.zeros(256, 0)}
    vector = write_vector(tmp_path / "l.safetensors", factors, mode=Mode.LORA,
                          extra={"lora_alpha": "4"})
    result = cli(["apply", "--base", files["base"], vector, "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "rank 0" in result.stderr
