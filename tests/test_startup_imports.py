"""Commands that only read files import neither open_clip nor torchvision (fast pipeline stages).

Each command runs in its own interpreter, as one stage of ``extract | negate | apply`` does;
after it finished, the interpreter's ``sys.modules`` says what it imported. Timings are the
business of ``benchmarks/startup_bench.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

HEAVY = ("open_clip", "torchvision")
MARKER = "tvtool-test-imported:"

# Runs the CLI as `tvtool ARGS` does, then reports which heavy packages were imported.
WRAPPER = f"""
import sys
from tvtool.cli.app import main
sys.argv = ["tvtool", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
heavy = [name for name in {HEAVY!r} if name in sys.modules]
print({MARKER!r}, ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def run_stage(args: list[str], stdin: bytes | None = None) -> tuple[int, bytes, list[str]]:
    """Run ``tvtool ARGS`` in a fresh interpreter: exit code, stdout, heavy packages imported."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", WRAPPER, *args], input=stdin,
                          capture_output=True, env=env, cwd=root, timeout=300)
    stderr = done.stderr.decode(errors="replace")
    lines = [line for line in stderr.splitlines() if line.startswith(MARKER)]
    assert lines, stderr
    imported = [name for name in lines[-1][len(MARKER):].strip().split(",") if name]
    assert done.returncode == 0, stderr
    return done.returncode, done.stdout, imported


@pytest.fixture(scope="module")
def stage_files(files, tmp_path_factory):
    """The tvtool-tiny files of conftest and a directory for the outputs."""
    return {**files, "out": tmp_path_factory.mktemp("startup")}


# Checkpoint bases (a tvtool checkpoint file) are covered by the pipeline test below.
FILE_LEVEL = {
    "negate": lambda f: ["negate", f["tv1"], "-o", str(f["out"] / "negated.safetensors")],
    "inspect": lambda f: ["inspect", f["tv1"], f["tv2"]],
    "merge": lambda f: ["merge", f["tv1"], f["tv2"], "-o", str(f["out"] / "merged.safetensors")],
    "compress": lambda f: ["compress", f["tv1"], "--rank", "2", "-o",
                           str(f["out"] / "compressed.safetensors")],
    "extract, embedded base": lambda f: ["extract", f["ft1"], "--base", TINY, "-o",
                                         str(f["out"] / "extracted-embedded.safetensors")],
    "apply, NAME:PATH base": lambda f: ["apply", "--base", f"{TINY}:{f['base']}", f["tv1"],
                                        "-o", str(f["out"] / "applied-named.safetensors")],
    "apply, embedded base": lambda f: ["apply", "--base", TINY, f["tv1"], "-o",
                                       str(f["out"] / "applied-embedded.safetensors"),
                                       "--allow-base-mismatch"],
}


@pytest.mark.parametrize("name", list(FILE_LEVEL))
def test_file_level_commands_import_neither_open_clip_nor_torchvision(stage_files, name):
    args = FILE_LEVEL[name](stage_files)
    _, stdout, imported = run_stage(args)
    assert imported == [], f"tvtool {' '.join(args)} imported {imported}"
    if "-o" in args:  # the command did its work: the output it names exists
        output = args[args.index("-o") + 1]
        assert stdout.decode().strip() == output
        assert Path(output).stat().st_size > 0


def test_pipeline_stages_on_stdin_and_stdout_stay_light(stage_files):
    # extract ... -o - | negate - -o - | apply --base BASE - -o OUT, one interpreter per stage.
    out = stage_files["out"] / "pipeline.safetensors"
    _, vector, extracted = run_stage(["extract", stage_files["ft1"], "--base",
                                      stage_files["base"], "-o", "-"])
    _, negated, negating = run_stage(["negate", "-", "-o", "-"], stdin=vector)
    _, _, applying = run_stage(["apply", "--base", stage_files["base"], "-", "-o", str(out)],
                               stdin=negated)
    assert (extracted, negating, applying) == ([], [], [])
    assert vector[:8] and negated[:8] and out.stat().st_size > 0


def test_the_check_sees_open_clip_where_a_command_builds_a_model(stage_files):
    # A base built by open_clip (NAME:random) needs it: the wrapper must report that import,
    # or the tests above would pass whatever the commands import.
    _, _, imported = run_stage(["extract", stage_files["ft1"], "--base", f"{TINY}:random",
                                "-o", str(stage_files["out"] / "from-random.safetensors"),
                                "--allow-missing"])
    assert "open_clip" in imported


def test_checkpoints_of_open_clip_architectures_are_read_without_open_clip(stage_files,
                                                                          tiny_state):
    # A checkpoint recording ViT-B-32 (tvtool-tiny's tensors: extract only compares files)
    # is checked against open_clip's config files, not its imported registry.
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind

    header = FileMeta(kind=Kind.CHECKPOINT, architecture="ViT-B-32").to_header()
    base = stage_files["out"] / "vit-b-32-base.safetensors"
    write_tensors(str(base), tiny_state, header)
    for name, ref in (("recorded", str(base)), ("named", f"ViT-B-32:{stage_files['base']}")):
        _, _, imported = run_stage(["extract", stage_files["ft1"], "--base", ref, "-o",
                                    str(stage_files["out"] / f"vit-{name}.safetensors")])
        assert imported == [], name


def test_the_config_files_name_what_open_clip_knows():
    import open_clip

    from tvtool.models import refs

    names = refs._config_names()
    assert names is not None and "ViT-B-32" in names
    assert names == set(open_clip.list_models())
    assert refs.is_known_architecture("ViT-B-32") and not refs.is_known_architecture("ViT-B-23")
