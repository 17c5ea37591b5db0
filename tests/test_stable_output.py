"""Stable output and provenance (issue 25 §3, §4).

Byte-identical ``--json`` and files across runs of the same inputs, a ``report`` kind and
version in every ``--json`` document, and outputs that record how they were made: input
fingerprints (checked against an independent sha256), versions, time, searches, dataset
sources, and the chain ``inspect`` shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from tvtool.metadata import MAX_LINEAGE_DEPTH

EPOCH = "1700000000"
EPOCH_TEXT = "2023-11-14T22:13:20Z"  # datetime.fromtimestamp(1700000000, timezone.utc)


def _independent_fingerprint(path: str) -> str:
    """sha256 over sorted names: "name|torch.dtype|(shape)\\n" then the raw bytes (numpy)."""
    digest = hashlib.sha256()
    with safe_open(path, "np") as handle:
        for name in sorted(handle.keys()):
            array = np.asarray(handle.get_tensor(name))  # (ascontiguousarray makes 0-d 1-d)
            shape = "(" + "".join(f"{s}, " for s in array.shape).removesuffix(", ") + \
                ("," if array.ndim == 1 else "") + ")"
            digest.update(f"{name}|torch.{array.dtype}|{shape}\n".encode())
            digest.update(array.tobytes(order="C"))
    return "sha256:" + digest.hexdigest()


def _provenance(path: str) -> dict:
    with safe_open(path, "np") as handle:
        return json.loads(handle.metadata()["tvtool.provenance"])


def _metadata(path: str) -> dict:
    with safe_open(path, "np") as handle:
        return dict(handle.metadata())


@pytest.fixture()
def epoch(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)


@pytest.fixture()
def chain(cli, files, tmp_path, epoch):
    """base -> two vectors (one negated) -> ties merge -> applied model, all from the CLI."""
    paths = {"neg": str(tmp_path / "neg.safetensors"), "merged": str(tmp_path / "m.safetensors"),
             "model": str(tmp_path / "model.safetensors")}
    assert cli(["negate", files["tv2"], "-o", paths["neg"]]).exit_code == 0
    assert cli(["merge", files["tv1"], paths["neg"], "-m", "ties", "--density", "0.5",
                "-a", "0.7", "-a", "0.9", "-o", paths["merged"]]).exit_code == 0
    assert cli(["apply", paths["merged"], "-b", files["base"], "-a", "0.5",
                "-o", paths["model"]]).exit_code == 0
    return paths


# ---------------------------------------------------------------- byte-identical output


def test_files_are_byte_identical_with_source_date_epoch(cli, files, tmp_path, epoch):
    for args in (["negate", files["tv1"]], ["merge", files["tv1"], files["tv2"]],
                 ["apply", files["tv1"], "-b", files["base"]],
                 ["extract", files["ft1"], "-b", files["base"], "-d", "synthetic:shape"]):
        out = tmp_path / "out.safetensors"
        blobs = []
        for _ in range(3):  # safetensors hands metadata over in a fresh hash order each time
            assert cli([*args, "-o", str(out)]).exit_code == 0
            blobs.append(out.read_bytes())
            out.unlink()
        assert blobs[0] == blobs[1] == blobs[2], args[0]


def test_without_source_date_epoch_only_the_time_differs(cli, files, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    out = tmp_path / "n.safetensors"
    assert cli(["negate", files["tv1"], "-o", str(out)]).exit_code == 0
    prov = _provenance(str(out))
    assert prov["time"].endswith("Z") and len(prov["time"]) == len(EPOCH_TEXT)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    again = tmp_path / "again.safetensors"
    assert cli(["negate", files["tv1"], "-o", str(again)]).exit_code == 0
    second = _provenance(str(again))
    assert second["time"] == EPOCH_TEXT
    for record in (prov, second):
        record.pop("time")
        record["arguments"].pop("output")
    assert prov == second


def test_a_bad_source_date_epoch_is_refused(cli, files, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    out = tmp_path / "n.safetensors"
    result = cli(["negate", files["tv1"], "-o", str(out)])
    assert result.exit_code == 2 and "SOURCE_DATE_EPOCH" in result.stderr
    assert not out.exists()


def test_inspect_json_is_byte_stable_across_processes(chain, files):
    # Separate processes with different hash seeds: set and dict orders change between them.
    outputs = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run([sys.executable, "-m", "tvtool", "inspect", chain["model"],
                               chain["merged"], files["tv1"], "--json"],
                              capture_output=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    assert len(outputs) == 1
    document = json.loads(outputs.pop())
    keys = list(document["files"][0]["metadata"])
    assert keys == sorted(keys)


# ---------------------------------------------------------------- report kinds


@pytest.mark.parametrize("command", ["extract", "negate", "apply", "merge", "merge-plan",
                                     "inspect", "datasets"])
def test_every_json_document_names_its_report(cli, files, tmp_path, command):
    out = str(tmp_path / "o.safetensors")
    args = {"extract": ["extract", files["ft1"], "-b", files["base"], "-o", out],
            "negate": ["negate", files["tv1"], "-o", out],
            "apply": ["apply", files["tv1"], "-b", files["base"], "-o", out],
            "merge": ["merge", files["tv1"], files["tv2"], "-o", out],
            "merge-plan": ["merge", files["tv1"], files["tv2"], "--dry-run"],
            "inspect": ["inspect", files["tv1"]],
            "datasets": ["datasets"]}[command]
    result = cli([*args, "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert list(document)[:2] == ["report", "report_version"]
    assert document["report"] == command and document["report_version"] == 1


def test_report_kind_is_kept_and_versioned():
    from tvtool.cli.common import with_report

    assert with_report({"a": 1}, "x") == {"report": "x", "report_version": 1, "a": 1}
    own = {"report": "negate-search", "report_version": 2, "b": 2}
    assert with_report(own, "negate") == own


# ---------------------------------------------------------------- provenance


def test_merge_records_input_fingerprints_versions_and_time(chain, files):
    from importlib import metadata

    prov = _provenance(chain["merged"])
    assert [i["file"] for i in prov["inputs"]] == [files["tv1"], chain["neg"]]
    assert [i["fingerprint"] for i in prov["inputs"]] == [
        _independent_fingerprint(files["tv1"]), _independent_fingerprint(chain["neg"])]
    assert [i["coef"] for i in prov["inputs"]] == [0.7, 0.9]
    assert prov["versions"]["open_clip"] == metadata.version("open_clip_torch")
    assert prov["time"] == EPOCH_TEXT


def test_apply_records_sources_as_paths_not_reprs(cli, files, tmp_path, epoch):
    from tvtool.io import open_tensors, write_tensors
    from tvtool.metadata import FileMeta

    # A vector with no dataset: its path is what `sources` names.
    source = open_tensors(files["tv1"])
    meta = FileMeta.from_header(source.metadata, "tv1").with_changes(dataset=None)
    bare = tmp_path / "digits.tv.safetensors"
    write_tensors(str(bare), {n: source.get(n) for n in source.keys()}, meta.to_header())
    source.close()
    out = tmp_path / "model.safetensors"
    assert cli(["apply", str(bare), files["tv2"], "-b", files["base"], "-o", str(out)]
               ).exit_code == 0
    assert json.loads(_metadata(str(out))["tvtool.sources"]) == [str(bare), "task2"]


def test_inspect_shows_the_whole_chain(chain, cli, files):
    result = cli(["inspect", chain["model"], "--json"])
    assert result.exit_code == 0, result.stderr
    root = json.loads(result.stdout)["files"][0]["chain"]
    assert root["command"] == "apply" and root["kind"] == "checkpoint"
    assert root["base_ref"] == files["base"]
    (merged,) = root["inputs"]
    assert merged["file"] == chain["merged"] and merged["coef"] == 0.5
    assert merged["fingerprint"] == _independent_fingerprint(chain["merged"])
    lineage = merged["lineage"]
    assert lineage["command"] == "merge" and lineage["merge"]["method"] == "ties"
    assert lineage["merge"]["params"]["density"] == 0.5
    first, negated = lineage["inputs"]
    assert first["file"] == files["tv1"] and first["lineage"]["dataset"] == "task1"
    assert negated["lineage"]["operations"] == [{"coef": 1.0, "op": "negate"}]
    (original,) = negated["lineage"]["inputs"]
    assert original["file"] == files["tv2"] and original["coef"] == -1.0
    assert original["fingerprint"] == _independent_fingerprint(files["tv2"])
    assert original["lineage"]["command"] == "extract"
    (finetuned,) = original["lineage"]["inputs"]
    assert finetuned["role"] == "finetuned"
    assert finetuned["fingerprint"] == _independent_fingerprint(files["ft2"])
    # The same chain, readable, on stderr.
    text = cli(["inspect", chain["model"]]).stderr
    for piece in ("[checkpoint by apply]", "0.5 × ", "[task_vector by merge]", "ties(",
                  "[task_vector by negate]", "-1 × ", "[task_vector by extract]"):
        assert piece in text, piece


def test_a_long_lineage_is_cut_not_refused(cli, files, tmp_path, epoch):
    current = files["tv1"]
    for index in range(MAX_LINEAGE_DEPTH + 3):
        nxt = str(tmp_path / f"n{index}.safetensors")
        assert cli(["negate", current, "-o", nxt]).exit_code == 0
        current = nxt
    result = cli(["inspect", current, "--json"])
    assert result.exit_code == 0, result.stderr
    node, depth = json.loads(result.stdout)["files"][0]["chain"], 0
    while node.get("inputs") and "lineage" in node["inputs"][0]:
        node, depth = node["inputs"][0]["lineage"], depth + 1
    assert node["inputs"] == [{"truncated": True}]
    assert depth == MAX_LINEAGE_DEPTH - 1
    # The table wraps long lines inside its cells: compare without spaces and borders.
    flat = re.sub(r"[\s│]", "", cli(["inspect", current]).stderr)
    assert "(olderinputsnotrecorded)" in flat


def test_extract_records_the_finetuned_checkpoint_but_no_dataset_source(cli, files, tmp_path):
    out = tmp_path / "tv.safetensors"
    assert cli(["extract", files["ft1"], "-b", files["base"], "-d", "synthetic:shape",
                "-o", str(out)]).exit_code == 0
    prov = _provenance(str(out))
    (item,) = prov["inputs"]
    assert item["role"] == "finetuned" and item["file"] == files["ft1"]
    assert item["fingerprint"] == _independent_fingerprint(files["ft1"])
    assert "dataset" not in prov


def test_learn_coeffs_scores_are_held_out_and_provenance_has_sources(cli, files, tmp_path):
    from tvtool.synthetic_world.tasks import GENERATOR_VERSION

    out = tmp_path / "c.safetensors"
    result = cli(["learn-coeffs", files["tv1"], files["tv2"], "-b", files["base"],
                  "-d", "synthetic:shape", "--shots", "2", "--steps", "2", "--eval-every", "1",
                  "--granularity", "task", "--protocol", "tvtool", "-o", str(out),
                  "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for record in (*report["initial"], *report["best"], *report["zero_shot"]):
        assert record["role"] == "task" and record["part"] == "held-out"
    # The atlas protocol (ce's default) selects on the labelled val split, and says so.
    atlas = cli(["learn-coeffs", files["tv1"], files["tv2"], "-b", files["base"],
                 "-d", "synthetic:shape", "--shots", "2", "--epochs", "1", "--eval-limit", "8",
                 "--granularity", "task", "-o", str(tmp_path / "a.safetensors"),
                 "--device", "cpu", "--json"])
    assert atlas.exit_code == 0, atlas.stderr
    for record in json.loads(atlas.stdout)["best"]:
        assert record["role"] == "task" and record["part"] == "val-split"
    prov = _provenance(str(out))
    assert [i["fingerprint"] for i in prov["inputs"]] == [
        _independent_fingerprint(files["tv1"]), _independent_fingerprint(files["tv2"])]
    (data,) = prov["datasets"]
    assert data["name"] == "synthetic:shape" and data["role"] == "task"
    assert data["source"]["generator_version"] == GENERATOR_VERSION
