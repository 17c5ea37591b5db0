"""One spelling per dataset: every comparison of dataset names compares identities (issue 22 §4).

The reported failure: a vector records ``imagefolder:/abs/path``, a report lists the dataset as
typed (``imagefolder:./data``), the names never matched, and every result of the report became a
"fine-tuned" reference (a normalized accuracy of 247.86 %, exit 0).
"""

from __future__ import annotations

import json

import pytest

from tvtool.data import dataset_identity
from tvtool.errors import UsageError
from tvtool.evaluate.reference import references_from_document


def test_identities(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    absolute = f"imagefolder:{tmp_path / 'data'}"
    for spelling in ("imagefolder:data", "imagefolder:./data", " ImageFolder: data/ ",
                     absolute, f"imagefolder:{tmp_path}/x/../data"):
        assert dataset_identity(spelling) == absolute, spelling
    assert dataset_identity("mnist") == dataset_identity("MNIST") == "MNIST"
    assert dataset_identity("cars") == "StanfordCars"
    assert dataset_identity("mnistval") == "MNISTVal"
    assert dataset_identity("SYNTHETIC:Shape") == "synthetic:shape"
    assert dataset_identity(" task1 ") == "task1"  # unknown names compare as written


def _report(results: list[str], own: str) -> dict:
    return {"model": {"vectors": [{"path": "ft.safetensors", "dataset": own}]},
            "results": [{"dataset": d, "accuracy": 0.5 + 0.1 * i, "num_classes": 2}
                        for i, d in enumerate(results)]}


def test_reference_report_as_typed_matches_the_vector_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pets").mkdir()
    recorded = f"imagefolder:{tmp_path / 'pets'}"  # what extract/finetune record
    document = _report(["imagefolder:./pets", "synthetic:shape"], recorded)
    references = references_from_document(document, "r.json")
    # Only the fine-tuned model's own task is its reference; the other result (a zero-shot
    # accuracy on another task) must not become one.
    assert list(references) == [recorded]
    assert references[recorded].accuracy == 0.5


def test_reference_mapping_keys_are_identities():
    references = references_from_document({"mnist": 0.9, "synthetic:SHAPE": 0.8}, "r")
    assert set(references) == {"MNIST", "synthetic:shape"}
    with pytest.raises(Exception, match="two reference accuracies"):
        references_from_document({"mnist": 0.9, "MNIST": 0.8}, "r")


def test_eval_refuses_one_dataset_spelled_twice():
    from tvtool.evaluate import EvalConfig, EvalSettings

    with pytest.raises(UsageError, match="given twice"):
        EvalConfig(settings=EvalSettings(base="tvtool-tiny"),
                   datasets=("synthetic:shape", "SYNTHETIC:Shape"))


def test_eval_reports_the_identity_and_finds_its_reference(cli, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reference = tmp_path / "ref.json"
    reference.write_text(json.dumps({"synthetic:shape": 0.5}))
    result = cli(["eval", "--base", files["base"], "-d", "Synthetic:Shape", "--limit", "4",
                  "--reference", str(reference), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    entry = report["results"][0]
    assert entry["dataset"] == "synthetic:shape"
    assert entry["reference_accuracy"] == 0.5
    assert entry["normalized_accuracy"] == pytest.approx(entry["accuracy"] / 0.5)


def test_merge_coefficients_keyed_by_another_spelling(files):
    from tvtool.merge.coefficients import VectorId, from_json

    ids = [VectorId(files["tv1"], "MNIST"), VectorId(files["tv2"], "synthetic:shape")]
    coefficients = from_json({"mnist": 0.25, "SYNTHETIC:shape": 0.75}, ids, "c.json")
    assert coefficients.per_vector == (0.25, 0.75)


def test_searches_refuse_one_dataset_spelled_twice(cli, files, tmp_path):
    from tvtool.merge.config import MergeConfig
    from tvtool.workflows.merge_search import vector_datasets

    config = MergeConfig(vectors=(files["tv1"], files["tv2"]), output="o.safetensors")
    with pytest.raises(UsageError, match="share a dataset"):
        vector_datasets(config, ["synthetic:shape", "SYNTHETIC:shape"])
    assert vector_datasets(config, ["mnist", "synthetic:Color"]) == ["MNIST", "synthetic:color"]
    result = cli(["negate", files["tv1"], "--search", "--base", files["base"], "--target",
                  "synthetic:shape", "--control", "Synthetic:Shape", "-o",
                  str(tmp_path / "n.safetensors")])
    assert result.exit_code == 2 and "both the target and a control" in result.stderr


def test_learn_coeffs_refuses_a_dataset_given_twice(cli, files, tmp_path):
    result = cli(["learn-coeffs", files["tv1"], "--base", files["base"], "-d",
                  "synthetic:shape", "--objective", "negation", "--control", "SYNTHETIC:shape",
                  "-o", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 2 and "given twice" in result.stderr, result.stderr
