"""Resumable pre-training: an interrupted run continued from its state ends where an
uninterrupted run ends, and a state of another run or a damaged one is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tvtool.errors import InvalidInputError, UsageError, interruption_note
from tvtool.io.train_state import read_train_state, write_train_state
from tvtool.synthetic_world.pretrain import (
    PRETRAIN_STATE_FILE,
    PretrainCheckpoints,
    PretrainConfig,
    pretrain_tiny,
)

CONFIG = PretrainConfig(steps=6, batch=8, warmup=2, seed=3)


@pytest.fixture(scope="module")
def uninterrupted():
    """The reference: the same six steps in one go, no checkpoints."""
    return pretrain_tiny(CONFIG)


def _interrupt_after(step_index: int):
    def progress(step: int, loss: float) -> None:
        if step == step_index:
            raise KeyboardInterrupt

    return progress


def _interrupted_run(workdir, every: int = 2, after: int = 4) -> PretrainCheckpoints:
    checkpoints = PretrainCheckpoints(str(workdir), every=every)
    with pytest.raises(KeyboardInterrupt) as caught:
        pretrain_tiny(CONFIG, progress=_interrupt_after(after), checkpoints=checkpoints)
    note = interruption_note(caught.value)
    assert note is not None and f"state of step {every * ((after + 1) // every)}" in note
    assert "run the same command again" in note
    return checkpoints


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted):
    checkpoints = _interrupted_run(tmp_path)
    _, state = read_train_state(checkpoints.path)
    assert state["step"] == 4
    started = []
    resumed = pretrain_tiny(CONFIG, checkpoints=checkpoints, on_start=started.append)
    assert started == [4]
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert different == []


def test_a_run_without_its_corpus_position_would_differ(tmp_path, uninterrupted):
    """The check above can fail: restoring weights and moments but not the corpus stream
    (a fresh stream from the seed) ends elsewhere."""
    checkpoints = _interrupted_run(tmp_path)
    tensors, state = read_train_state(checkpoints.path)
    from tvtool.synthetic_world.scenes import rng_for
    from tvtool.synthetic_world.tasks import STREAM_VERSION

    state["corpus_rng"] = rng_for("tvtool-world", STREAM_VERSION, "corpus",
                                  CONFIG.seed).bit_generator.state
    write_train_state(checkpoints.path, tensors, state)
    resumed = pretrain_tiny(CONFIG, checkpoints=checkpoints)
    assert any(not torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_resume_no_starts_over_and_yes_needs_a_state(tmp_path, uninterrupted):
    checkpoints = _interrupted_run(tmp_path)
    started = []
    again = pretrain_tiny(CONFIG, checkpoints=dataclasses.replace(checkpoints, resume="no"),
                          on_start=started.append)
    assert started == [0]
    assert all(torch.equal(again[k], uninterrupted[k]) for k in again)
    with pytest.raises(InvalidInputError, match="no pre-training state"):
        pretrain_tiny(CONFIG, checkpoints=PretrainCheckpoints(str(tmp_path / "empty"),
                                                              resume="yes"))


def test_a_state_of_another_run_is_refused(tmp_path):
    checkpoints = _interrupted_run(tmp_path)
    other = dataclasses.replace(CONFIG, lr=CONFIG.lr / 2)
    with pytest.raises(InvalidInputError, match=r"different pre-training run.*lr"):
        pretrain_tiny(other, checkpoints=checkpoints)


@pytest.mark.parametrize("damage, message", [
    (lambda t, s: t.pop(next(k for k in t if k.startswith("optim/"))), "missing|damaged"),
    (lambda t, s: s.update(corpus_rng={"bit_generator": "PCG64"}), "corpus stream"),
    (lambda t, s: s.update(step=99), "'step' must be"),
    (lambda t, s: s.update(format=7), "format"),
    (lambda t, s: t.update({"rng/torch_cpu": torch.full_like(t["rng/torch_cpu"], 255)}),
     "malformed RNG state"),
])
def test_a_damaged_state_is_refused(tmp_path, damage, message):
    checkpoints = _interrupted_run(tmp_path)
    tensors, state = read_train_state(checkpoints.path)
    damage(tensors, state)
    write_train_state(checkpoints.path, tensors, state)
    with pytest.raises(InvalidInputError, match=message):
        pretrain_tiny(CONFIG, checkpoints=checkpoints)


def test_checkpoint_settings_are_checked():
    with pytest.raises(UsageError, match="checkpoint-every"):
        PretrainCheckpoints("w", every=0)
    with pytest.raises(UsageError, match="--resume"):
        PretrainCheckpoints("w", resume="maybe")


def test_pretrain_cli_resumes_from_its_workdir(cli, tmp_path):
    out, workdir = tmp_path / "base.safetensors", tmp_path / "work"
    args = ["pretrain", "-o", str(out), "--steps", "4", "--batch-size", "4",
            "--workdir", str(workdir), "--checkpoint-every", "2", "--json"]
    first = cli(args)
    assert first.exit_code == 0, first.stderr
    assert (workdir / PRETRAIN_STATE_FILE).is_file()
    again = cli(args)  # the saved state of step 2 is continued
    assert again.exit_code == 0, again.stderr
    assert "resuming from step 2 of 4" in again.stderr
    import json

    assert json.loads(again.stdout)["resumed_from"] == 2


def test_pretrain_cli_resume_options_need_a_workdir(cli, tmp_path):
    out = tmp_path / "x.safetensors"
    result = cli(["pretrain", "-o", str(out), "--steps", "1", "--resume", "no"])
    assert result.exit_code == 2 and "--resume needs --workdir" in result.stderr
    assert not out.exists()


def test_pretrain_cli_trains_on_threads_and_records_the_count(cli, tmp_path):
    """The weights depend on torch's thread count, so the output names it."""
    import json

    out = tmp_path / "base.safetensors"
    before = torch.get_num_threads()
    result = cli(["pretrain", "-o", str(out), "--steps", "2", "--batch-size", "4",
                  "--threads", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["torch_threads"] == 1
    assert torch.get_num_threads() == before  # the caller's setting is restored
    shown = cli(["inspect", str(out), "--json"])
    assert json.loads(shown.stdout)["files"][0]["provenance"]["arguments"]["torch_threads"] == 1


def test_pretrain_cli_refuses_zero_threads(cli, tmp_path):
    out = tmp_path / "base.safetensors"
    result = cli(["pretrain", "-o", str(out), "--steps", "1", "--threads", "0"])
    assert result.exit_code == 2 and "--threads" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("shift, noted", [(0, False), (1, True)])
def test_a_state_of_another_thread_count_is_continued_with_a_note(tmp_path, shift, noted):
    checkpoints = _interrupted_run(tmp_path)
    tensors, state = read_train_state(checkpoints.path)
    assert state["torch_threads"] == torch.get_num_threads()
    state["torch_threads"] += shift
    write_train_state(checkpoints.path, tensors, state)
    notes: list[str] = []
    pretrain_tiny(CONFIG, checkpoints=checkpoints, log=notes.append)
    assert any(f"trained on {state['torch_threads']} torch threads" in note
               for note in notes) is noted
