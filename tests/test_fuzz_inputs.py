"""Fuzzing the readers of untrusted files: every outcome is success or a clean exit-2 error.

Three readers take files from elsewhere: safetensors (header JSON and tvtool metadata), YAML
merge configs, and pickled torch checkpoints. Hypothesis generates hostile variants (wrong
offsets, deep nesting, huge numbers, aliases, byte flips and truncations of real files); each
must either be read or raise a :class:`~tvtool.errors.TvtoolError` with exit code 2, never
another exception (an "internal error", exit 1). Examples are derandomized, so the suite is
reproducible, and bounded to a few seconds.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvtool.commands.negate import json_list
from tvtool.errors import TvtoolError
from tvtool.io import open_tensors, read_pickled_checkpoint
from tvtool.io.yaml_io import parse_yaml
from tvtool.merge.config import config_from_document
from tvtool.merge.registry import get_method
from tvtool.metadata import FileMeta

FUZZ = settings(max_examples=60, deadline=timedelta(seconds=10), derandomize=True,
                database=None, suppress_health_check=[HealthCheck.too_slow])


def _clean(call) -> None:
    """Run ``call``; it may succeed or raise an exit-2 TvtoolError, nothing else."""
    try:
        call()
    except TvtoolError as exc:
        assert exc.exit_code == 2, exc.one_line()
        text = exc.one_line()
        assert "\n" not in text and len(text) < 1000, text


# ------------------------------------------------------------------------- safetensors

_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "X9", "", "F8_E4M3"]

_nested_json = st.integers(0, 5000).map(lambda n: "[" * n + "]" * n)
_json_text = st.one_of(
    _nested_json,
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                 max_leaves=10).map(json.dumps),
    st.text(max_size=30),
)
_metadata = st.dictionaries(
    st.sampled_from(["tvtool.kind", "tvtool.format_version", "tvtool.mode",
                     "tvtool.linearized", "tvtool.provenance", "tvtool.operations",
                     "tvtool.architecture", "other"]),
    st.one_of(st.sampled_from(["task_vector", "checkpoint", "1", "full", "lora", "true"]),
              _json_text),
    max_size=5)


@st.composite
def safetensors_files(draw) -> bytes:
    header: dict = {}
    for index in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(st.integers(-2, 6), max_size=3))
        start = draw(st.integers(-4, 200))
        end = draw(st.integers(-4, 200))
        header[f"t{index}"] = {"dtype": draw(st.sampled_from(_DTYPES)), "shape": shape,
                               "data_offsets": [start, end]}
    meta = draw(_metadata)
    if meta or draw(st.booleans()):
        header["__metadata__"] = meta
    text = json.dumps(header).encode()
    if draw(st.booleans()):
        text += b" " * draw(st.integers(0, 7))  # padding, as writers align the header
    length = len(text) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**40))
    data = draw(st.binary(max_size=256))
    return struct.pack("<Q", length) + text + data


def _read_safetensors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        path.write_bytes(data)

        def read() -> None:
            source = open_tensors(str(path))
            try:
                for name in source.keys():
                    source.get(name)
                metadata = source.metadata
                if "tvtool.kind" in metadata:
                    FileMeta.from_header(metadata, "f")
                json_list(metadata.get("tvtool.operations"))
            finally:
                source.close()

        _clean(read)


@FUZZ
@given(safetensors_files())
def test_fuzz_safetensors_headers(data):
    _read_safetensors(data)


# ------------------------------------------------------------------------- YAML configs

_scalars = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**400), 10**400), st.text(max_size=8),
    st.sampled_from(["ties", "task_arithmetic", "dare", "global", "zero", "refuse", "sum"]),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                       max_leaves=12)
_KEYS = ["version", "vectors", "method", "params", "coef", "coefs_file", "seed", "missing",
         "allow_base_mismatch", "mixed_modes_as", "output", "other"]


@st.composite
def yaml_configs(draw) -> str:
    document = draw(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6))
    if draw(st.booleans()):
        document["vectors"] = draw(st.lists(
            st.one_of(st.text(min_size=1, max_size=5),
                      st.fixed_dictionaries({"path": st.text(max_size=5)},
                                            optional={"coef": _scalars})), max_size=3))
    if draw(st.booleans()):
        document["params"] = draw(st.dictionaries(
            st.sampled_from(["density", "trim", "sign", "disjoint", "rescale", "combine", "x"]),
            _scalars, max_size=3))
    text = yaml.safe_dump(document, sort_keys=False)
    hostile = draw(st.sampled_from([
        "", "extra: &a [1, 2]\nmore: [*a, *a]\n", "params: " + "[" * 200 + "]" * 200 + "\n",
        "coef: " + "9" * 5000 + "\n", "coef: !!python/object:os.system ls\n", ": :\n",
        "vectors: [a]\nvectors: [b]\n", "\t- tab\n", "params: {density: .nan}\n",
    ]))
    return text + hostile if draw(st.booleans()) else hostile + text


def _configure(text: str) -> None:
    document = parse_yaml(text, "c.yaml")
    config = config_from_document(document, label="c.yaml", output="o.safetensors")
    get_method(config.method).make_params(config.params)


@FUZZ
@given(yaml_configs())
def test_fuzz_yaml_configs(text):
    _clean(lambda: _configure(text))


@FUZZ
@given(st.text(alphabet="[]{}:,-&*!?|>'\"#%@` \n\tab19.", max_size=200))
def test_fuzz_yaml_syntax(text):
    _clean(lambda: _configure(text))


# ------------------------------------------------------------------------- pickled checkpoints


def _saved(zip_format: bool) -> bytes:
    buffer = io.BytesIO()
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.float16),
             "v": torch.arange(4, dtype=torch.int64)[1:3]}
    torch.save(state, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


_SEEDS = {True: _saved(True), False: _saved(False)}


@st.composite
def mutated_checkpoints(draw) -> bytes:
    data = bytearray(_SEEDS[draw(st.booleans())])
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "set", "cut", "insert", "int"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "int" and len(data) >= at + 4:
            # Declared sizes and lengths are little-endian integers: make one huge.
            data[at:at + 4] = struct.pack("<I", draw(st.sampled_from(
                [0xFFFFFFFF, 0x7FFFFFFF, 2**24, 2**31 + 1])))
    return bytes(data)


def _read_pickle(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pt"
        path.write_bytes(data)
        _clean(lambda: read_pickled_checkpoint(str(path)))


@FUZZ
@given(mutated_checkpoints())
def test_fuzz_legacy_and_zip_checkpoints(data):
    _read_pickle(data)


@pytest.mark.parametrize("zip_format", [True, False])
def test_fuzz_seeds_are_readable(tmp_path, zip_format):
    # The unmutated seeds read, so the fuzz explores near valid files, not only garbage.
    path = tmp_path / "seed.pt"
    path.write_bytes(_SEEDS[zip_format])
    tensors = read_pickled_checkpoint(str(path)).tensors
    assert torch.equal(tensors["v"], torch.tensor([1, 2]))
