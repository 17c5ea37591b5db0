"""The fine-tuning loop: schedule, data stream, resume, divergence, DDP, learning."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from tvtool.errors import InvalidInputError, NumericalError, UsageError
from tvtool.finetune import FinetuneConfig, finetune, learning_rate
from tvtool.finetune.config import RESUME_FILE
from tvtool.finetune.sampling import DistInfo, MicroBatches, SampleStream
from tvtool.finetune.schedule import default_warmup, total_steps

BASE = "tvtool-tiny:random"


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class RandomImages(Dataset):
    """Seeded random images; labels shift the first channel so the task is learnable."""

    def __init__(self, size: int = 32, classes: int = 4, seed: int = 0,
                 poison_from: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, 32, 32, generator=gen)
        self.labels = torch.randint(0, classes, (size,), generator=gen)
        self.images[:, 0] += self.labels.view(-1, 1, 1).float()
        self.poison_from = poison_from
        self.calls = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.calls += 1
        image = self.images[index]
        # Random augmentation: must be reproducible through resumption.
        image = image + 0.01 * torch.randn(image.shape)
        if self.poison_from is not None and self.calls > self.poison_from:
            image = torch.full_like(image, float("nan"))
        return image, int(self.labels[index])


def _head() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return 20 * nn.functional.normalize(torch.randn(4, 64, generator=gen), dim=-1)


def _config(tmp_path: Path, name: str, **changes) -> FinetuneConfig:
    values = dict(base=BASE, dataset="random", output=str(tmp_path / f"{name}.safetensors"),
                  mode="full", steps=6, batch_size=8, lr=1e-3, workers=0, log_every=1,
                  lora_rank=2, lora_alpha=4.0)
    values.update(changes)
    return FinetuneConfig.from_values(values)


def test_learning_rate_schedule_follows_the_reference():
    total, warmup, peak = 2000, 500, 1e-5
    assert learning_rate(0, total, warmup, peak) == pytest.approx(peak / warmup)
    assert learning_rate(warmup - 1, total, warmup, peak) == pytest.approx(peak)
    assert learning_rate(warmup, total, warmup, peak) == pytest.approx(peak)
    middle = warmup + (total - warmup) // 2
    assert learning_rate(middle, total, warmup, peak) == pytest.approx(peak / 2)
    assert learning_rate(total - 1, total, warmup, peak) < 1e-3 * peak
    assert learning_rate(3, 10, 0, peak) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.3)) * peak)
    assert default_warmup(2000) == 500 and default_warmup(40) == 10 and default_warmup(3) == 0


def test_run_length_from_steps_epochs_or_default(tmp_path):
    assert total_steps(_config(tmp_path, "a", steps=7), 100) == 7
    assert total_steps(_config(tmp_path, "a", steps=None, epochs=2.0), 100) == 25
    assert total_steps(_config(tmp_path, "a", steps=None), 100) == 2000


@pytest.mark.parametrize(("changes", "message"), [
    ({"epochs": 1.0}, "both given"),
    ({"steps": 0}, "--steps"),
    ({"batch_size": 10, "grad_accum": 3}, "divisible"),
    ({"lr": float("nan")}, "--lr"),
    ({"precision": "fp8"}, "precision"),
    ({"resume": True}, "--workdir"),
    ({"mode": "linear", "checkpoint_out": "x.safetensors"}, "checkpoint-out"),
    ({"mode": "llora-net", "checkpoint_out": "x.safetensors"}, "checkpoint-out"),
    ({"mode": "lora", "lora_targets": ("q", "qkv")}, "LoRA targets"),
    ({"grad_clip": -1.0}, "grad-clip"),
])
def test_bad_configurations_are_usage_errors(tmp_path, changes, message):
    with pytest.raises(UsageError, match=message):
        _config(tmp_path, "bad", **changes)
    with pytest.raises(UsageError, match="mode"):
        _config(tmp_path, "bad", mode="partial")


def test_micro_batches_partition_each_global_batch():
    stream = SampleStream(10, seed=3)
    seen: dict[int, list[int]] = {}
    for rank in range(2):
        sampler = MicroBatches(stream, batch_size=8, grad_accum=2, info=DistInfo(rank, 2, rank),
                               start_step=1, total_steps=4)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 6 and all(len(b) == 2 for b in batches)
        for position in [p for batch in batches for _, p in batch]:
            seen.setdefault(position // 8, []).append(position)
    for step, positions in seen.items():
        assert sorted(positions) == list(range(step * 8, step * 8 + 8))
    # Each epoch is a permutation of the dataset.
    assert sorted(stream.index(p) for p in range(10, 20)) == list(range(10))
    again = SampleStream(10, seed=3)
    assert [again.index(p) for p in range(30)] == [stream.index(p) for p in range(30)]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("mode", ["full", "linear", "lora"])
def test_resume_equals_an_uninterrupted_run(tmp_path, mode):
    head = _head()
    straight = _config(tmp_path, f"straight-{mode}", mode=mode, workdir=str(tmp_path / "w1"),
                       checkpoint_every=3)
    finetune(straight, dataset=RandomImages(), head=head)

    def stop_at_3(step: int) -> None:
        if step == 3:
            raise _Interrupt

    interrupted = _config(tmp_path, f"resumed-{mode}", mode=mode, workdir=str(tmp_path / "w2"),
                          checkpoint_every=3)
    with pytest.raises(_Interrupt):
        finetune(interrupted, dataset=RandomImages(), head=head, after_step=stop_at_3)
    assert not Path(interrupted.output).exists()
    assert (tmp_path / "w2" / RESUME_FILE).exists()
    resumed = finetune(replace(interrupted, resume=True),
                       dataset=RandomImages(), head=head)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    first, second = load_file(straight.output), load_file(interrupted.output)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_resume_refuses_a_different_run(tmp_path):
    head = _head()
    config = _config(tmp_path, "a", workdir=str(tmp_path / "w"), checkpoint_every=2, steps=4)
    finetune(config, dataset=RandomImages(), head=head)
    changed = replace(config, resume=True, lr=2e-3)
    with pytest.raises(InvalidInputError, match="different run"):
        finetune(changed, dataset=RandomImages(), head=head)
    missing = replace(config, resume=True, workdir=str(tmp_path / "empty"))
    with pytest.raises(InvalidInputError, match="no training state"):
        finetune(missing, dataset=RandomImages(), head=head)


def test_llora_state_of_the_network_level_variant_does_not_resume(tmp_path):
    """Training states written when `llora` was the network-level model lack the marker."""
    from tvtool.finetune.resume import _run_key
    from tvtool.io.train_state import check_run_key as _check_run_key

    config = _config(tmp_path, "ll", mode="llora")
    current = _run_key(config, "sha256:x", 6, 0, 32)
    assert current["llora"] == "per-adapter"
    old = {k: v for k, v in current.items() if k != "llora"}
    with pytest.raises(InvalidInputError, match=r"different run.*llora"):
        _check_run_key(old, current, "state")
    _check_run_key(current, current, "state")
    assert "llora" not in _run_key(_config(tmp_path, "l", mode="lora"), "sha256:x", 6, 0, 32)


def test_run_key_takes_the_modes_option_fields_and_old_states_still_resume(tmp_path):
    """The LoRA modes' options keep the resume keys states have always stored."""
    from tvtool.finetune.resume import _run_key
    from tvtool.io.train_state import check_run_key as _check_run_key

    lora = _run_key(_config(tmp_path, "l", mode="lora"), "sha256:x", 6, 0, 32)
    assert (lora["lora_rank"], lora["lora_alpha"], lora["lora_targets"]) == (2, 4.0, ["q", "v"])
    with pytest.raises(InvalidInputError, match=r"different run.*lora_rank"):
        _check_run_key({**lora, "lora_rank": 3}, lora, "state")
    # A full-mode key no longer holds the LoRA settings, which never affected that run; a
    # state saved when every key held them still resumes.
    full = _run_key(_config(tmp_path, "f", mode="full"), "sha256:x", 6, 0, 32)
    assert not any(k.startswith("lora_") for k in full)
    _check_run_key({**full, "lora_rank": 16, "lora_alpha": 32.0, "lora_targets": ["q", "v"]},
                   full, "state")


def test_non_finite_loss_stops_the_run_and_writes_nothing(tmp_path):
    config = _config(tmp_path, "nan", workdir=str(tmp_path / "w"), checkpoint_every=2, steps=6,
                     checkpoint_out=str(tmp_path / "ft.safetensors"))
    # 8 images per step: images after the 24th (step 4 onwards) are NaN.
    with pytest.raises(NumericalError, match="NaN or Inf") as caught:
        finetune(config, dataset=RandomImages(poison_from=24), head=_head())
    assert "between steps 3 and 4" in caught.value.one_line()
    assert not Path(config.output).exists()
    assert not (tmp_path / "ft.safetensors").exists()
    from tvtool.io.train_state import read_train_state

    tensors, state = read_train_state(str(tmp_path / "w" / RESUME_FILE))
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("param/"))
    # The live metrics log stays with the state (a resumed run continues it): it holds the
    # steps logged before the loss became non-finite, all finite.
    leftovers = [p for p in (tmp_path / "w").iterdir() if p.name not in (RESUME_FILE,
                                                                         "metrics.jsonl")]
    assert leftovers == []
    logged = [json.loads(line) for line in
              (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]  # log_every=1; step 4 diverged
    assert all(math.isfinite(r["loss"]) for r in logged)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, monkeypatch):
    # Adam's first steps are about lr * sign(g): on near-zero gradients summation-order noise
    # flips whole steps, so the accumulated gradient is compared through SGD, whose update is
    # linear in it.
    def sgd(groups, lr, weight_decay, **_):
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)

    monkeypatch.setattr(torch.optim, "AdamW", sgd)
    head = _head()
    one = _config(tmp_path, "one", steps=2, lr=1e-2)
    two = _config(tmp_path, "two", steps=2, lr=1e-2, grad_accum=2)
    finetune(one, dataset=RandomImages(), head=head)
    finetune(two, dataset=RandomImages(), head=head)
    a, b = load_file(one.output), load_file(two.output)
    assert a.keys() == b.keys()
    moved = max(float(t.abs().max()) for t in a.values())
    assert moved > 1e-5
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4 * moved)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    result = finetune(_config(tmp_path, "bf16", steps=2, precision="bf16", mode="linear"),
                      dataset=RandomImages(), head=_head())
    assert result.precision == "bf16" and math.isfinite(result.final_loss)


def test_fine_tuning_raises_accuracy_on_a_synthetic_task(tmp_path):
    from torch.utils.data import Subset

    from tvtool.data import load_split
    from tvtool.models import build_zero_shot_head, load_clip

    # The embedded pre-trained base, as users start from; shape has the most room above
    # zero-shot among the quick tasks.
    base = "tvtool-tiny"
    bundle = load_clip(base)
    name = "synthetic:shape"
    test = load_split(name, "test", bundle.preprocess_eval)
    test = Subset(test, range(300))
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    head = build_zero_shot_head(bundle, test.dataset.spec.classnames, test.dataset.spec.templates)

    def accuracy(encoder: nn.Module) -> float:
        with torch.no_grad():
            logits = nn.functional.normalize(encoder(images), dim=-1) @ head.T
        return float((logits.argmax(-1) == labels).float().mean())

    before = accuracy(bundle.model.visual)
    trained = {}
    config = FinetuneConfig(base=base, dataset=name, output=str(tmp_path / "tv.safetensors"),
                            mode="full", steps=100, batch_size=64, lr=1e-3, workers=0)
    result = finetune(config, on_trained=lambda adapter: trained.update(adapter=adapter))
    after = accuracy(trained["adapter"].encoder.eval())
    assert result.dataset == name and result.steps == 100
    # 0.1 is about three standard errors of an accuracy measured on 300 images.
    assert after > before + 0.1, (before, after)


_DDP_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from torch.utils.data import Dataset
    from tvtool.finetune import FinetuneConfig, finetune
    from tvtool.io import write_tensors

    torch.set_num_threads(1)
    out, mode = sys.argv[1], sys.argv[2]

    class Images(Dataset):
        def __init__(self):
            gen = torch.Generator().manual_seed(0)
            self.x = torch.randn(32, 3, 32, 32, generator=gen)
            self.y = torch.randint(0, 4, (32,), generator=gen)
        def __len__(self):
            return 32
        def __getitem__(self, i):
            return self.x[i] + 0.01 * torch.randn(3, 32, 32), int(self.y[i])

    head = 20 * nn.functional.normalize(
        torch.randn(4, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    config = FinetuneConfig(base="tvtool-tiny:random", dataset="random", mode=mode,
                            output=f"{out}/tv.safetensors", steps=3, batch_size=8, lr=1e-3,
                            workers=0, device="cpu")

    def dump(adapter):
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_initialized() else 0
        write_tensors(f"{out}/rank{rank}.safetensors", adapter.trainable_state())

    result = finetune(config, dataset=Images(), head=head, on_trained=dump)
    assert result.world_size == int(sys.argv[3])
""")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ddp_two_processes_equal_one_process(tmp_path):
    # linear: the hand-written autograd Functions under DDP gradient all-reduce. Two processes
    # that merely agree with each other could both be wrong (e.g. gradients never reduced);
    # the reference is one process over the same global batches.
    mode = "linear"
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         str(script), str(two), mode, "2"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(one), mode, "1"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    rank0 = load_file(str(two / "rank0.safetensors"))
    rank1 = load_file(str(two / "rank1.safetensors"))
    reference = load_file(str(one / "rank0.safetensors"))
    assert rank0.keys() == rank1.keys() == reference.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    vector = load_file(str(two / "tv.safetensors"))
    single_vector = load_file(str(one / "tv.safetensors"))
    assert vector.keys() == single_vector.keys()
    diff = torch.cat([(vector[n] - single_vector[n]).abs().reshape(-1) for n in vector])
    update = torch.cat([single_vector[n].abs().reshape(-1) for n in vector])
    assert update.max() > 1e-3  # it trained (lr 1e-3, 3 Adam steps)
    # The all-reduce averages two half-batch gradients instead of one mean: rounding only
    # (measured: 99th percentile 6e-10). A few entries whose exact gradient is zero (attention
    # key biases) get ±lr from Adam normalising rounding noise, in either run: bounded by 1e-4.
    # Training on the wrong examples moves the 99th percentile to ~3e-3 (one process fed half
    # of each batch).
    assert float(diff.quantile(0.99)) < 1e-7, float(diff.quantile(0.99))
    assert float(diff.max()) < 1e-4, float(diff.max())



# ------------------------------------------------------------------------- --resume auto


def test_resume_values_and_the_earlier_flag(tmp_path):
    assert _config(tmp_path, "a").resume == "auto"  # the default, with or without --workdir
    assert _config(tmp_path, "a", resume=True, workdir="w").resume == "yes"
    assert _config(tmp_path, "a", resume=False).resume == "no"
    with pytest.raises(UsageError, match="--resume must be auto, yes, no"):
        _config(tmp_path, "a", resume="maybe")
    with pytest.raises(UsageError, match="--resume needs --workdir"):
        _config(tmp_path, "a", resume="yes")


def _interrupt_at(stop: int):
    def after(step: int) -> None:
        if step == stop:
            raise KeyboardInterrupt
    return after


def test_auto_resume_continues_a_compatible_state_and_refuses_another(tmp_path):
    from tvtool.errors import interruption_note

    head = _head()
    straight = _config(tmp_path, "straight", workdir=str(tmp_path / "w1"), checkpoint_every=2)
    finetune(straight, dataset=RandomImages(), head=head)
    config = _config(tmp_path, "auto", workdir=str(tmp_path / "w2"), checkpoint_every=2)
    assert config.resume == "auto"
    # A fresh --workdir: auto starts; Ctrl-C after step 3 leaves the state of step 2.
    with pytest.raises(KeyboardInterrupt) as caught:
        finetune(config, dataset=RandomImages(), head=head, after_step=_interrupt_at(3))
    state = tmp_path / "w2" / RESUME_FILE
    assert interruption_note(caught.value) == (
        f"stopped after step 3 of 6; the training state of step 2 is in {state}: run the same "
        "command again to continue from it")
    assert not Path(config.output).exists()
    saved = state.read_bytes()
    # Another run's settings: refused, exit 2, the state left as it was.
    with pytest.raises(InvalidInputError, match=r"different run.*lr") as refused:
        finetune(replace(config, lr=2e-3), dataset=RandomImages(), head=head)
    assert "--resume no" in (refused.value.hint or "") and refused.value.exit_code == 2
    assert state.read_bytes() == saved and not Path(config.output).exists()
    # The same command again (a CI retry) continues, and ends where an uninterrupted run does.
    resumed = finetune(config, dataset=RandomImages(), head=head)
    assert resumed.resumed_from == 2 and resumed.steps == 6
    first, second = load_file(straight.output), load_file(config.output)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    # --resume no starts over under other settings and replaces the state.
    other = finetune(replace(config, lr=2e-3, resume="no"), dataset=RandomImages(), head=head)
    assert other.resumed_from == 0 and state.read_bytes() != saved


def test_interruption_note_without_a_saved_state(tmp_path):
    from tvtool.errors import interruption_note

    head = _head()
    plain = _config(tmp_path, "plain")
    with pytest.raises(KeyboardInterrupt) as caught:
        finetune(plain, dataset=RandomImages(), head=head, after_step=_interrupt_at(2))
    assert interruption_note(caught.value) == (
        "stopped after step 2 of 6; nothing was saved (--workdir DIR makes a run resumable)")
    early = _config(tmp_path, "early", workdir=str(tmp_path / "w"), checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt) as caught:
        finetune(early, dataset=RandomImages(), head=head, after_step=_interrupt_at(2))
    assert interruption_note(caught.value) == (
        f"stopped after step 2 of 6; no training state was saved yet (every 4 steps, "
        f"--checkpoint-every, into {tmp_path / 'w'})")
