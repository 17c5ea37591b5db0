"""`tvtool eval` and `tvtool pretrain` on the command line: output conventions and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tvtool.evaluate import clear_memory_cache

DATASET = "synthetic:shape"


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("TVTOOL_CACHE_DIR", str(root))
    clear_memory_cache()
    yield root
    clear_memory_cache()


def write_imagefolder(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int = 10,
                      seed: int = 0) -> Path:
    """Class folders of noisy solid-colour 32x32 PNGs."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = np.clip(np.array(colour)[None, None, :]
                             + rng.integers(-20, 21, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_eval_prints_table_on_stderr_and_nothing_on_stdout(cli, files):
    result = cli(["eval", "--base", files["base"], "--dataset", DATASET, "--limit", "32",
                  "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert DATASET in result.stderr and "accuracy" in result.stderr
    # stderr is not a terminal here: no progress bar, no carriage returns or cursor codes
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr


def test_eval_on_the_validation_split(cli, files):
    val = cli(["eval", "--base", files["base"], "-d", DATASET, "--split", "val", "--limit", "16",
               "--device", "cpu", "--json"])
    test = cli(["eval", "--base", files["base"], "-d", DATASET, "--limit", "16",
                "--device", "cpu", "--json"])
    assert val.exit_code == 0 and test.exit_code == 0, val.stderr + test.stderr
    val_split, test_split = (json.loads(r.stdout)["splits"][0] for r in (val, test))
    assert val_split["split"] == "val" and test_split["split"] == "test"
    assert val_split["manifest"]["hashes"]["val"] == test_split["manifest"]["hashes"]["val"]
    assert (val_split["split_size"], test_split["split_size"]) == (500, 1000)
    assert val_split["examples"] == 16


def test_eval_json_and_out_file(cli, files, tmp_path):
    out = tmp_path / "report.json"
    result = cli(["eval", files["tv1"], "--base", files["base"], "-d", DATASET,
                  "-d", "synthetic:color", "--coef", "0.5", "--limit", "24", "--device", "cpu",
                  "--json", "--output", str(out)])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert json.loads(out.read_text()) == document
    assert [r["dataset"] for r in document["results"]] == [DATASET, "synthetic:color"]
    assert document["model"]["vectors"][0]["coef"] == 0.5
    assert document["report"] == "eval" and document["splits"][0]["manifest"]
    plain = cli(["eval", "--base", files["base"], "-d", DATASET, "--limit", "24",
                 "--device", "cpu", "-o", str(tmp_path / "again.json")])
    assert plain.exit_code == 0, plain.stderr
    assert plain.stdout.strip() == str(tmp_path / "again.json")


def test_eval_options_and_vectors_in_any_order(cli, files):
    args_a = ["eval", files["tv1"], "--base", files["base"], files["tv2"], "-d", DATASET,
              "--limit", "16", "--device", "cpu", "--json", "-a", "0.3", "-a", "0.6"]
    args_b = ["eval", "--limit", "16", "-a", "0.3", "-d", DATASET, "-a", "0.6", "--device",
              "cpu", "--json", "--base", files["base"], files["tv1"], files["tv2"]]
    a, b = cli(args_a), cli(args_b)
    assert a.exit_code == 0 and b.exit_code == 0, a.stderr + b.stderr
    doc_a, doc_b = json.loads(a.stdout), json.loads(b.stdout)
    assert doc_a["results"] == doc_b["results"]
    assert [v["coef"] for v in doc_a["model"]["vectors"]] == [0.3, 0.6]


def test_eval_reads_vector_from_stdin(cli, files):
    vector = Path(files["tv1"]).read_bytes()
    piped = cli(["eval", "-", "--base", files["base"], "-d", DATASET, "--limit", "16",
                 "--device", "cpu", "--json"], input=vector)
    direct = cli(["eval", files["tv1"], "--base", files["base"], "-d", DATASET, "--limit", "16",
                  "--device", "cpu", "--json"])
    assert piped.exit_code == 0, piped.stderr
    assert json.loads(piped.stdout)["results"] == json.loads(direct.stdout)["results"]


def test_eval_imagefolder_of_pngs(cli, files, tmp_path):
    root = write_imagefolder(tmp_path / "colours", {"red": (220, 30, 30), "blue": (30, 30, 220),
                                                    "green": (30, 200, 30)})
    result = cli(["eval", "--base", files["base"], "-d", f"imagefolder:{root}", "--device",
                  "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    (entry,) = json.loads(result.stdout)["results"]
    assert entry["num_classes"] == 3 and entry["total"] == 6  # the fixed 20% hold-out of 30
    split = json.loads(result.stdout)["splits"][0]
    assert split["classnames"] == ["blue", "green", "red"]


def test_eval_normalized_accuracy_from_reference_reports(cli, files, tmp_path):
    ref = tmp_path / "ft.json"
    first = cli(["eval", files["tv1"], "--base", files["base"], "-d", DATASET, "--limit", "24",
                 "--device", "cpu", "-o", str(ref)])
    assert first.exit_code == 0, first.stderr
    result = cli(["eval", "--base", files["base"], "-d", DATASET, "--limit", "24",
                  "--device", "cpu", "--reference", str(ref), "--json"])
    assert result.exit_code == 0, result.stderr
    (entry,) = json.loads(result.stdout)["results"]
    reference = json.loads(ref.read_text())["results"][0]["accuracy"]
    assert entry["reference_accuracy"] == reference
    assert entry["normalized_accuracy"] == pytest.approx(entry["accuracy"] / reference)


def test_eval_help_lists_disentanglement(cli):
    result = cli(["eval", "--help"])
    assert result.exit_code == 0
    assert "disentanglement" in result.stdout and "--dataset" in result.stdout
    assert cli(["--help"]).stdout.count("pretrain") >= 1


# ------------------------------------------------------------------ bad input: exit 2, no output


def _refused(cli, args, tmp_path, message):
    out = tmp_path / "out" / "report.json"
    out.parent.mkdir()
    before = listing(tmp_path)
    result = cli([*args, "--device", "cpu", "--output", str(out)])
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tvtool: error:")
    assert result.stdout == ""
    assert not out.exists() and listing(tmp_path) == before
    return result


def test_missing_data_root_is_refused(cli, files, tmp_path):
    _refused(cli, ["eval", "--base", files["base"], "-d", "MNIST", "--data-root",
                   str(tmp_path / "nowhere")], tmp_path, "nowhere")


def test_missing_imagefolder_is_refused(cli, files, tmp_path):
    _refused(cli, ["eval", "--base", files["base"], "-d", f"imagefolder:{tmp_path / 'none'}"],
             tmp_path, "does not exist")


def test_empty_split_is_refused(cli, files, tmp_path):
    root = write_imagefolder(tmp_path / "tiny", {"a": (0, 0, 0), "b": (255, 255, 255)},
                             per_class=1)
    _refused(cli, ["eval", "--base", files["base"], "-d", f"imagefolder:{root}"], tmp_path,
             "no examples in split 'test'")


def test_imagefolder_without_classes_is_refused(cli, files, tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(cli, ["eval", "--base", files["base"], "-d", f"imagefolder:{tmp_path / 'empty'}"],
             tmp_path, "no class folders")


def test_imagefolder_with_only_a_test_folder_is_refused(cli, files, tmp_path):
    # Once read as one class named "test" and reported at 100.00% accuracy with exit 0.
    write_imagefolder(tmp_path / "only-test" / "test", {"a": (0, 0, 0), "b": (255, 255, 255)},
                      per_class=3)
    _refused(cli, ["eval", "--base", files["base"], "-d",
                   f"imagefolder:{tmp_path / 'only-test'}"], tmp_path,
             "has split folders ('test') but no training folder")


def test_unreadable_image_is_refused(cli, files, tmp_path):
    root = write_imagefolder(tmp_path / "broken", {"a": (0, 0, 0), "b": (255, 255, 255)})
    for path in sorted((root / "a").iterdir()):
        path.write_bytes(b"not a png")
    _refused(cli, ["eval", "--base", files["base"], "-d", f"imagefolder:{root}"], tmp_path,
             "cannot read image")


def test_classnames_file_mismatch_is_refused(cli, files, tmp_path):
    root = write_imagefolder(tmp_path / "named", {"a": (0, 0, 0), "b": (255, 255, 255)})
    (root / "classnames.txt").write_text("black\nwhite\ngrey\n")
    _refused(cli, ["eval", "--base", files["base"], "-d", f"imagefolder:{root}"], tmp_path,
             "lists 3 class names but there are 2 class folders")


def test_head_file_class_count_mismatch_is_refused(cli, files, tmp_path):
    from tvtool.evaluate import head_key, head_metadata, open_eval_model, zero_shot_head
    from tvtool.io import write_tensors

    with open_eval_model(files["base"]) as model:
        key = head_key(model.base_fingerprint, "x", ["one", "two"], ["{}"])
        head = zero_shot_head(model.bundle, key, ["{}"], disk_cache=False)
    path = tmp_path / "head.safetensors"
    write_tensors(str(path), {"head": head}, head_metadata(key))
    _refused(cli, ["eval", "--base", files["base"], "-d", DATASET, "--head", str(path)],
             tmp_path, "scores 2 classes, the dataset has 6")


def test_reference_class_count_mismatch_is_refused(cli, files, tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({DATASET: {"accuracy": 0.9, "num_classes": 4}}))
    _refused(cli, ["eval", "--base", files["base"], "-d", DATASET, "--reference", str(ref)],
             tmp_path, "4 classes, the dataset has 6")


@pytest.mark.parametrize("target, message", [
    ("tv1", "is also an input"),
    ("missing-dir", "does not exist"),
])
def test_bad_out_is_refused_before_any_work(cli, files, tmp_path, target, message):
    out = files["tv1"] if target == "tv1" else str(tmp_path / "nope" / "r.json")
    result = cli(["eval", files["tv1"], "--base", files["base"], "-d", "synthetic:nope",
                  "--device", "cpu", "--output", out])
    # Refused on the output, before the (bad) dataset is even looked at.
    assert result.exit_code == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["eval", "-d", DATASET], "missing option --base"),
    (["eval", "--base", "tvtool-tiny:random"], "no dataset"),
    (["eval", "--base", "tvtool-tiny:random", "-d", DATASET, "--split", "nope"], "unknown split"),
    (["eval", "--base", "tvtool-tiny:random", "-d", "synthetic:nope"], "synthetic"),
])
def test_usage_errors(cli, args, message):
    result = cli(args)
    assert result.exit_code == 2
    assert message in result.stderr and result.stdout == ""


# ------------------------------------------------------------------ pretrain


def test_pretrain_writes_a_usable_base(cli, tmp_path):
    out = tmp_path / "tiny.safetensors"
    result = cli(["pretrain", "-o", str(out), "--steps", "2", "--batch-size", "8", "--seed", "1"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    evaluated = cli(["eval", "--base", str(out), "-d", DATASET, "--limit", "16", "--device",
                     "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["model"]["architecture"] == "tvtool-tiny"


def test_pretrain_default_output_is_the_cache_copy(cli, cache):
    result = cli(["pretrain", "--steps", "1", "--batch-size", "4"])
    assert result.exit_code == 0, result.stderr
    assert Path(result.stdout.strip()) == cache / "tvtool-tiny.safetensors"
    assert (cache / "tvtool-tiny.safetensors").is_file()


def test_pretrain_bad_steps_writes_nothing(cli, tmp_path):
    out = tmp_path / "x.safetensors"
    result = cli(["pretrain", "-o", str(out), "--steps", "0"])
    assert result.exit_code == 2 and "steps" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_pretrain_the_demo_model_records_its_architecture_and_recipe(cli, tmp_path):
    from tvtool.synthetic_world.pretrain import PretrainConfig

    out = tmp_path / "small.safetensors"
    result = cli(["pretrain", "--model", "tvtool-small", "-o", str(out), "--steps", "1",
                  "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    meta = json.loads(cli(["inspect", str(out), "--json"]).stdout)["files"][0]
    assert meta["metadata"]["tvtool.architecture"] == "tvtool-small"
    assert meta["provenance"]["arguments"]["model"] == "tvtool-small"
    # The packaged weights' recipe: the demo's model pre-trains twice as long as the tiny one.
    assert PretrainConfig.recipe("tvtool-small").steps == 2 * PretrainConfig.recipe().steps


def test_pretrain_refuses_a_model_that_is_not_embedded(cli, tmp_path):
    out = tmp_path / "x.safetensors"
    result = cli(["pretrain", "--model", "ViT-B-32", "-o", str(out), "--steps", "1"])
    assert result.exit_code == 2 and "embedded model" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_unpackaged_base_is_created_in_the_cache_and_then_resolves(cli, cache):
    from tvtool.synthetic_world.pretrain import PretrainConfig

    # tvtool-base's weights do not ship: by name it is an error that says how to create them.
    missing = cli(["eval", "--base", "tvtool-base", "-d", DATASET, "--limit", "8"])
    assert missing.exit_code == 2 and missing.stdout == ""
    assert "tvtool pretrain --model tvtool-base" in missing.stderr
    result = cli(["pretrain", "--model", "tvtool-base", "--steps", "1", "--batch-size", "4"])
    assert result.exit_code == 0, result.stderr
    assert Path(result.stdout.strip()) == cache / "tvtool-base.safetensors"
    evaluated = cli(["eval", "--base", "tvtool-base", "-d", DATASET, "--limit", "8",
                     "--device", "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["model"]["architecture"] == "tvtool-base"
    meta = json.loads(cli(["inspect", str(cache / "tvtool-base.safetensors"), "--json"]).stdout)
    # The recipe of the results' base: as long as tvtool-small, at half the peak rate.
    assert meta["files"][0]["provenance"]["arguments"]["lr"] == 1e-3
    assert PretrainConfig.recipe("tvtool-base").steps == PretrainConfig.recipe("tvtool-small").steps
    assert PretrainConfig.recipe("tvtool-base").lr == PretrainConfig.recipe("tvtool-small").lr / 2
