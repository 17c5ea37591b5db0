"""Progress without a terminal, metrics logs, ``tvtool plot`` and whole tables (issue 25 §1)."""

from __future__ import annotations

import io
import json
import math
import re
import struct
import sys

import pytest
import torch

from tests.test_merge_search import world  # noqa: F401 - the fixture
from tvtool.progress import Reporter


class Clock:
    """A fake monotonic clock: tests move it by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _reporter(every: float = 30.0, quiet: bool = False) -> tuple[Reporter, list[str], Clock]:
    lines: list[str] = []
    clock = Clock()
    return Reporter(lines.append, quiet=quiet, every=every, clock=clock), lines, clock


# ---------------------------------------------------------------- the reporter


def test_lines_come_at_most_every_interval_with_position_fields_rate_and_eta():
    reporter, lines, clock = _reporter(every=30.0)
    with reporter.task("fine-tuning", 100, unit="step") as task:
        for step in range(1, 101):
            clock.now = float(step)  # one step a second
            task.update(completed=step, loss=1.0 / step, lr=1e-5, acc=0.5)
    # Due at t = 30, 60, 90 (30 s after the previous line), then one closing line.
    assert len(lines) == 4, lines
    first = lines[0]
    assert first.startswith("fine-tuning: step 30/100 (30%)")
    assert f"loss {1.0 / 30:.4g}" in first and "lr 1.00e-05" in first and "acc 0.5" in first
    # 30 steps in 30 s: 1 step/s, 70 left: 70 s.
    assert "1.00 step/s" in first and "ETA 1m10s" in first and "elapsed 30s" in first
    assert lines[1].startswith("fine-tuning: step 60/100") and "ETA 40s" in lines[1]
    assert lines[2].startswith("fine-tuning: step 90/100")
    assert lines[3].startswith("fine-tuning: step 100/100 (100%)") and lines[3].endswith("(done)")


def test_many_fast_updates_print_nothing_before_the_interval():
    reporter, lines, clock = _reporter(every=30.0)
    with reporter.task("eval", 10_000) as task:
        for i in range(10_000):
            clock.now = i * 0.001  # 10 s in all
            task(1)
    assert lines == []  # a short task leaves no line, and no closing line either


def test_quiet_prints_nothing():
    reporter, lines, clock = _reporter(every=0.0, quiet=True)
    with reporter.task("fine-tuning", 5, unit="step") as task:
        for _ in range(5):
            clock.now += 100
            task(1, loss=0.1)
    assert lines == []


def test_only_rank_zero_reports(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    reporter, lines, clock = _reporter(every=0.0)
    with reporter.task("fine-tuning", 5) as task:
        clock.now = 50
        task(1)
    assert lines == []


def test_nested_tasks_share_one_line_outermost_first():
    reporter, lines, clock = _reporter(every=10.0)
    with reporter.task("merge search", 4, unit="α") as outer:
        outer.update(current=2, completed=1)
        with reporter.task("MNIST (val)", 8) as inner:
            clock.now = 12.0
            inner(4)
    assert lines[0].startswith("merge search: α 2/4")
    assert " · MNIST (val): 4/8 (50%)" in lines[0]


def test_log_every_and_quiet_options_are_checked(cli):
    result = cli(["eval", "x.safetensors", "--log-every", "-1"])
    assert result.exit_code == 2 and "--log-every" in result.stderr


# ---------------------------------------------------------------- searches


def test_search_progress_says_alpha_k_of_n_and_the_running_best():
    from tvtool.workflows.search_progress import search_progress

    reporter, lines, _ = _reporter(every=0.0)
    scores = {0.1: 0.5, 0.2: 0.9, 0.3: 0.7}
    with search_progress(reporter, "merge search", 3, lambda acc: acc["d"],
                         what="normalized") as wrap:
        evaluate = wrap(lambda alpha: {"d": scores[alpha]})
        for alpha in (0.1, 0.2, 0.3):
            evaluate(alpha)
    text = "\n".join(lines)
    for k in (1, 2, 3):
        assert f"merge search: α {k}/3" in text
    assert "best α 0.2 (90.0% normalized)" in lines[-1]

    reporter, lines, _ = _reporter(every=0.0)
    with search_progress(reporter, "negation search", 3,
                         lambda acc: None if acc["d"] > 0.8 else acc["d"],
                         lower_is_better=True) as wrap:
        evaluate = wrap(lambda alpha: {"d": scores[alpha]})
        for alpha in (0.1, 0.2, 0.3):
            evaluate(alpha)
    assert "best α 0.1 (50.0%)" in lines[-1]  # 0.2 is infeasible, 0.3 scores higher


EVAL = ["--limit", "8", "--batch-size", "8", "--device", "cpu"]


def test_merge_search_prints_alpha_lines_without_a_terminal(cli, world, tmp_path):  # noqa: F811
    out = tmp_path / "searched.safetensors"
    result = cli(["merge", world["tv1"], world["tv2"], "--search-coef", "--base", world["base"],
                  "--coef-grid", "0.25,0.5", *EVAL, "-o", str(out), "--log-every", "0"])
    assert result.exit_code == 0, result.stderr
    assert "merge search (task_arithmetic): α 1/2 = 0.25" in result.stderr
    assert "α 2/2 = 0.5" in result.stderr and "best α " in result.stderr
    # The per-dataset evaluation of an α shows beneath its α, on the same line.
    assert re.search(r"α 2/2 = 0\.5 .*· synthetic:\w+ \(val\)", result.stderr)

    quiet = cli(["merge", world["tv1"], world["tv2"], "--search-coef", "--base", world["base"],
                 "--coef-grid", "0.25,0.5", *EVAL, "-o", str(out), "--log-every", "0", "-q"])
    assert quiet.exit_code == 0, quiet.stderr
    assert "α 1/2" not in quiet.stderr and "(val):" not in quiet.stderr


def test_negate_search_prints_alpha_lines(cli, world, tmp_path):  # noqa: F811
    out = tmp_path / "neg.safetensors"
    result = cli(["negate", world["tv1"], "--search", "--base", world["base"],
                  "--control", "synthetic:color", "--coef-grid", "0.25,0.5",
                  "--control-threshold", "0.01", *EVAL, "-o", str(out), "--log-every", "0"])
    assert result.exit_code == 0, result.stderr
    assert "negation search: α 1/2 = 0.25" in result.stderr
    assert "α 2/2 = 0.5" in result.stderr and "best α " in result.stderr


# ---------------------------------------------------------------- fine-tuning metrics

BASE = "tvtool-tiny:random"


def _lr(step_done: int, total: int, base_lr: float) -> float:
    """The reference schedule without warm-up, at the step that completed ``step_done``."""
    return 0.5 * (1.0 + math.cos(math.pi * (step_done - 1) / total)) * base_lr


@pytest.mark.slow
def test_finetune_metrics_log_continues_across_resume(tmp_path):
    from tvtool.finetune import FinetuneConfig, finetune

    torch.set_num_threads(1)
    out, workdir = tmp_path / "tv.safetensors", tmp_path / "wd"
    config = FinetuneConfig(base=BASE, dataset="synthetic:shape", output=str(out), steps=6,
                            batch_size=2, lr=1e-3, warmup_steps=0, device="cpu",
                            workdir=str(workdir), checkpoint_every=2, log_every=1)

    def stop(done: int) -> None:
        if done == 5:  # after the state of step 4 was saved and step 5 was logged
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(config, after_step=stop)
    live = workdir / "metrics.jsonl"
    assert [json.loads(x)["step"] for x in live.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert not out.exists() and not (tmp_path / "tv.metrics.jsonl").exists()

    result = finetune(config)
    assert result.resumed_from == 4
    assert result.metrics_log == str(tmp_path / "tv.metrics.jsonl")
    records = [json.loads(x) for x in (tmp_path / "tv.metrics.jsonl").read_text().splitlines()]
    # Step 5 of the interrupted run is dropped and done again: no duplicate, none lost.
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert live.read_text() == (tmp_path / "tv.metrics.jsonl").read_text()
    for record in records:
        assert set(record) == {"step", "loss", "lr", "train_accuracy", "images_per_s"}
        assert record["lr"] == pytest.approx(_lr(record["step"], 6, 1e-3))
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert 0.0 <= record["train_accuracy"] <= 1.0 and record["images_per_s"] > 0


@pytest.mark.slow
def test_finetune_cli_progress_lines_json_path_and_quiet(cli, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "tv.safetensors"
    args = ["finetune", "--base", BASE, "-d", "synthetic:shape", "--steps", "2",
            "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "-o", str(out)]
    result = cli([*args, "--json", "--log-every", "0"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    metrics = tmp_path / "tv.metrics.jsonl"
    assert summary["metrics_log"] == str(metrics)
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [2]
    line = next(x for x in result.stderr.splitlines() if "step 2/2" in x)
    assert line.startswith("fine-tuning: step 2/2 (100%)")
    assert "loss " in line and "lr " in line and "img/s" in line and "ETA" in line

    quiet = cli([*args, "--log-every", "0", "--quiet"])
    assert quiet.exit_code == 0, quiet.stderr
    assert "fine-tuning: step" not in quiet.stderr
    assert quiet.stdout.strip() == str(out)


def test_tensorboard_missing_extra_is_a_one_line_usage_error(cli, tmp_path, monkeypatch):
    # None in sys.modules makes `import torch.utils.tensorboard` raise ImportError.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "tv.safetensors"
    result = cli(["finetune", "--base", BASE, "-d", "synthetic:shape", "--steps", "1",
                  "--batch-size", "2", "--device", "cpu", "-o", str(out),
                  "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensorboard" in lines[0] and "extra" in lines[0]
    assert not out.exists() and not (tmp_path / "tb").exists()


@pytest.mark.slow
def test_tensorboard_writes_the_scalars(cli, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    out, board = tmp_path / "tv.safetensors", tmp_path / "tb"
    result = cli(["finetune", "--base", BASE, "-d", "synthetic:shape", "--steps", "2",
                  "--batch-size", "2", "--device", "cpu", "-o", str(out),
                  "--tensorboard", str(board)])
    assert result.exit_code == 0, result.stderr
    events = EventAccumulator(str(board))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [2]


# ---------------------------------------------------------------- learn-coeffs metrics


@pytest.fixture
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVTOOL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.slow
@pytest.mark.usefixtures("_isolated_cache")
def test_learn_coeffs_writes_a_metrics_log(cli, files, tmp_path):
    out = tmp_path / "c.safetensors"
    result = cli(["learn-coeffs", files["tv1"], files["tv2"], "--base", files["base"],
                  "-d", "synthetic:shape", "--shots", "2", "--steps", "2", "--eval-every", "1",
                  "--lr", "0.01", "--schedule", "cosine", "--device", "cpu", "-o", str(out),
                  "--json", "--log-every", "0"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    path = tmp_path / "c.metrics.jsonl"
    assert report["metrics_log"] == str(path)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # CosineAnnealingLR over 2 steps: step 1 at the full rate, step 2 at half of it.
    assert records[0]["lr"] == pytest.approx(0.01) and records[1]["lr"] == pytest.approx(0.005)
    for record in records:
        assert set(record) == {"step", "loss", "lr", "score", "images_per_s"}
        assert math.isfinite(record["loss"]) and record["images_per_s"] > 0
    assert "learning coefficients: 2/2" in result.stderr


# ---------------------------------------------------------------- tvtool plot


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_draws_a_png(cli, tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1 / s, "lr": 1e-3 * (10 - s),
                                       "images_per_s": 100.0}) + "\n" for s in range(1, 10)))
    out = tmp_path / "curve.png"
    result = cli(["plot", str(log), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["records"] == 9 and report["series"] == ["loss", "lr", "images_per_s"]
    width, height = _png_size(out.read_bytes())
    assert width >= 500 and height >= 300  # two columns, two rows of panels

    one = tmp_path / "loss.png"
    result = cli(["plot", str(log), "-o", str(one), "--metric", "loss"])
    assert result.exit_code == 0 and result.stdout.strip() == str(one)
    assert _png_size(one.read_bytes())[0] < width  # one panel


@pytest.mark.parametrize("text, message", [
    ('{"step": 1, "loss": 1}\nnot json\n', "line 2"),
    ('{"step": 1}\n[1, 2]\n', "line 2"),
    ('{"loss": 1}\n', "line 1"),
    ('{"step": "1", "loss": 1}\n', "line 1"),
    ("", "no records"),
])
def test_plot_refuses_malformed_logs(cli, tmp_path, text, message):
    log = tmp_path / "m.jsonl"
    log.write_text(text)
    out = tmp_path / "curve.png"
    result = cli(["plot", str(log), "-o", str(out)])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_plot_refuses_a_long_line_and_a_missing_metric(cli, tmp_path):
    from tvtool.metrics import MAX_METRICS_LINE

    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1, "loss": 1}\n{"step": 2, "x": "' + "a" * MAX_METRICS_LINE
                   + '"}\n')
    result = cli(["plot", str(log), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 2 and "line 2" in result.stderr
    log.write_text('{"step": 1, "loss": 1}\n')
    result = cli(["plot", str(log), "-o", str(tmp_path / "c.png"), "--metric", "score"])
    assert result.exit_code == 2 and "score" in result.stderr
    result = cli(["plot", str(log), "-o", str(tmp_path / "no" / "c.png")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


# ---------------------------------------------------------------- tables


def _wide_table():
    from rich.table import Table

    table = Table(title="results")
    table.add_column("dataset")
    table.add_column("accuracy %", justify="right")
    name = "imagefolder:/data/a/rather/long/path/to/a/dataset/" + "x" * 60
    table.add_row(name, "12.5")
    return table, name


def test_tables_to_a_file_are_not_cut(monkeypatch):
    from rich.console import Console

    from tvtool.cli.common import print_table

    monkeypatch.delenv("COLUMNS", raising=False)
    buffer = io.StringIO()
    table, name = _wide_table()
    print_table(table, Console(file=buffer, highlight=False))
    assert name in buffer.getvalue()
    assert max(len(line) for line in buffer.getvalue().splitlines()) > 80

    monkeypatch.setenv("COLUMNS", "100")
    buffer = io.StringIO()
    print_table(table, Console(file=buffer, highlight=False))
    assert max(len(line) for line in buffer.getvalue().splitlines()) <= 100


def test_a_terminal_gets_bars_not_lines():
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    lines: list[str] = []
    clock = Clock()
    reporter = Reporter(lines.append, terminal=True, console=console, every=0.0, clock=clock)
    with reporter.task("merge search", 2, unit="α") as outer:
        outer(0, current=1, best="α 0.1 (50.0%)")
        assert reporter._rich.tasks[0].description == "merge search α 1/2"
        with reporter.task("MNIST (val)", 3) as inner:
            clock.now = 5.0
            inner(3)
        outer(1)
    assert lines == []
    assert reporter._rich is None  # stopped when the last task ended
