"""Coefficient files: layout, validation, and applying them (tvtool.atlas.files)."""

from __future__ import annotations

import json

import pytest
import torch

from tvtool.atlas import (
    CoefficientSet,
    TensorSpec,
    build_partition,
    compose_state,
    read_coefficients,
    write_coefficients,
)
from tvtool.errors import InvalidInputError
from tvtool.io import DictSource, write_tensors
from tvtool.metadata import FileMeta, Kind
from tvtool.vectors import VectorInput

SPECS = [TensorSpec("visual.conv1.weight", (4, 3, 2, 2)), TensorSpec("visual.proj", (4, 2)),
         TensorSpec("visual.ln_post.bias", (4,))]
SOURCES = ({"path": "a.safetensors", "dataset": "synthetic:shape", "mode": "full",
            "linearized": False, "base_fingerprint": "sha256:aa"},
           {"path": "b.safetensors", "dataset": "synthetic:color", "mode": "full",
            "linearized": False, "base_fingerprint": "sha256:aa"})


def make_set(granularity: str = "tensor", seed: int = 0) -> CoefficientSet:
    partition = build_partition(SPECS, granularity, seed)
    matrix = torch.randn(2, partition.num_blocks, generator=torch.Generator().manual_seed(1))
    meta = FileMeta(kind=Kind.COEFFICIENTS, architecture="tvtool-tiny",
                    base_fingerprint="sha256:aa")
    return CoefficientSet(matrix, partition, SOURCES, meta)


@pytest.mark.parametrize("granularity", ["task", "tensor", "layer", "random:3"])
def test_roundtrip(tmp_path, granularity):
    coefs = make_set(granularity, seed=11)
    path = str(tmp_path / "c.safetensors")
    write_coefficients(path, coefs)
    back = read_coefficients(path)
    torch.testing.assert_close(back.coefficients, coefs.coefficients)
    assert back.partition.block_names == coefs.partition.block_names
    assert back.partition.tensors == coefs.partition.tensors
    assert back.sources == SOURCES
    header = coefs.to_header()
    assert header["tvtool.kind"] == "coefficients"
    assert header["tvtool.granularity"] == granularity
    assert json.loads(header["tvtool.block_names"]) == list(coefs.partition.block_names)
    if granularity.startswith("random"):
        assert header["tvtool.partition_seed"] == "11"
        assert header["tvtool.partition_k"] == "3"
        for spec in SPECS:  # the split is regenerated identically from the file alone
            assert torch.equal(back.partition.element_blocks(spec.name),
                               coefs.partition.element_blocks(spec.name))


def _vector_entry(label: str, fingerprint: str = "sha256:aa", shapes=None):
    meta = FileMeta(kind=Kind.TASK_VECTOR, base_fingerprint=fingerprint)
    return label, meta, shapes if shapes is not None else {s.name: s.shape for s in SPECS}


def test_check_vectors_count_and_shape_mismatch():
    coefs = make_set()
    coefs.check_vectors([_vector_entry("a"), _vector_entry("b")])
    with pytest.raises(InvalidInputError, match=r"2 rows .* 1 vectors were given") as info:
        coefs.check_vectors([_vector_entry("a")])
    assert "a.safetensors, b.safetensors" in info.value.one_line()
    bad = {s.name: s.shape for s in SPECS} | {"visual.proj": (2, 4)}
    with pytest.raises(InvalidInputError, match=r"'visual\.proj' has shape"):
        coefs.check_vectors([_vector_entry("a"), _vector_entry("b", shapes=bad)])
    with pytest.raises(InvalidInputError, match="another base"):
        coefs.check_vectors([_vector_entry("a"), _vector_entry("b", "sha256:bb")])
    coefs.check_vectors([_vector_entry("a"), _vector_entry("b", "sha256:bb")],
                        allow_base_mismatch=True)


def _write_raw(path, matrix, header):
    write_tensors(str(path), {"coefficients": matrix}, header, check_finite=False)


@pytest.mark.parametrize("damage, message", [
    (lambda h, m: (h, torch.zeros(2, 2)), "2 columns but 3 blocks"),
    (lambda h, m: (h | {"tvtool.block_names": json.dumps(["x", "y", "z"])}, m),
     "does not match"),
    (lambda h, m: (h | {"tvtool.sources": json.dumps([{}])}, m), "2 rows but 1 sources"),
    (lambda h, m: ({k: v for k, v in h.items() if k != "tvtool.granularity"}, m),
     "lacks metadata tvtool.granularity"),
    (lambda h, m: (h | {"tvtool.granularity": "blocks"}, m), "unknown granularity"),
    (lambda h, m: (h, m.reshape(-1)), "2-D floating"),
    (lambda h, m: (h, m.masked_fill(torch.ones_like(m, dtype=torch.bool), float("nan"))),
     "NaN"),
    (lambda h, m: (h | {"tvtool.kind": "task_vector"}, m), "not a coefficient file"),
])
def test_damaged_files_are_refused(tmp_path, damage, message):
    coefs = make_set()
    header, matrix = damage(coefs.to_header(), coefs.coefficients)
    path = tmp_path / "c.safetensors"
    _write_raw(path, matrix, header)
    with pytest.raises(InvalidInputError, match=message):
        read_coefficients(str(path))


def test_random_file_needs_seed_and_k(tmp_path):
    coefs = make_set("random:2", seed=4)
    header = {k: v for k, v in coefs.to_header().items() if k != "tvtool.partition_seed"}
    path = tmp_path / "c.safetensors"
    _write_raw(path, coefs.coefficients, header)
    with pytest.raises(InvalidInputError, match="partition_seed"):
        read_coefficients(str(path))
    header = coefs.to_header() | {"tvtool.partition_k": "3"}
    _write_raw(path, coefs.coefficients, header)
    with pytest.raises(InvalidInputError, match="disagrees"):
        read_coefficients(str(path))


@pytest.mark.parametrize("granularity", ["tensor", "random:2"])
def test_weight_builder_and_combine_match_compose_state(granularity):
    coefs = make_set(granularity, seed=2)
    base = {s.name: torch.randn(s.shape) for s in SPECS} | {"visual.other": torch.ones(3)}
    vectors = [{s.name: torch.randn(s.shape) for s in SPECS} for _ in range(2)]
    del vectors[1]["visual.proj"]
    expected = compose_state(base, vectors, coefs.coefficients, coefs.partition)
    inputs = [VectorInput(f"v{i}", DictSource(v, label=f"v{i}"),
                          FileMeta(kind=Kind.TASK_VECTOR, base_fingerprint="sha256:aa"))
              for i, v in enumerate(vectors)]
    built = coefs.weight_builder()(DictSource(base), inputs)
    assert set(built) == {s.name for s in SPECS}
    for name, tensor in built.items():
        torch.testing.assert_close(tensor, expected[name])
    assert coefs.combine("visual.other", [None, None]) is None
    assert coefs.tensor_coefficients("visual.other") is None
    with pytest.raises(InvalidInputError, match="1 vectors"):
        coefs.weight_builder()(DictSource(base), inputs[:1])
