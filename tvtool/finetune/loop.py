"""The training loop of one fine-tuning job, mode-agnostic.

A mode's :class:`~tvtool.finetune.base.Adapter` provides the trainable tensors, the forward
pass and the task vector. Everything that decides *which* examples a step sees is a pure
function of (seed, step), so a resumed run, a run with a different number of processes or
data-loader workers, and an uninterrupted run see the same batches: the global batch of step
``s`` is positions ``[s·B, (s+1)·B)`` of an endless stream made of one seeded permutation of
the dataset per epoch, split evenly over processes and accumulation micro-steps, and each
example's random augmentation is seeded by its position (:mod:`tvtool.finetune.sampling`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from tvtool.device import autocast
from tvtool.errors import (
    InvalidInputError,
    NumericalError,
    TvtoolError,
    UsageError,
    note_interruption,
)
from tvtool.finetune.base import Adapter
from tvtool.finetune.config import RESUME_FILE, FinetuneConfig, StepLog, TrainResult
from tvtool.finetune.resume import _load_state, _run_key, _save_state
from tvtool.finetune.sampling import (
    SINGLE_PROCESS,
    DistInfo,
    MicroBatches,
    SampleStream,
    SeededSamples,
)
from tvtool.finetune.schedule import default_warmup, learning_rate, total_steps
from tvtool.io import train_state


def classification_loss(model: torch.nn.Module, images: Tensor, labels: Tensor, head: Tensor,
                        device: torch.device, precision: str) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the frozen zero-shot head on the model's normalised image features.

    Returns:
        ``(loss, logits)``; the loss is float32 whatever the autocast precision.
    """
    with autocast(device, precision):
        features = model(images)
    logits = F.normalize(features.float(), dim=-1) @ head.T
    return F.cross_entropy(logits, labels), logits


@dataclass
class Optimisation:
    """AdamW over an adapter's trainable tensors, with clipping, scaling and θ-decay.

    Attributes:
        optimizer: The AdamW optimizer (fused on CUDA).
        scaler: Gradient scaler (enabled for fp16 only).
        names: Trainable names in optimizer parameter order.
        params: Trainable parameters in the same order.
        decay_pairs: ``(δ, θ0)`` for parameters that hold offsets (see
            :meth:`Adapter.decay_anchors`).
        weight_decay: Decoupled weight decay.
        grad_clip: Gradient-norm clip, 0 for none.
    """

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    names: list[str]
    params: list[torch.nn.Parameter]
    decay_pairs: list[tuple[torch.nn.Parameter, Tensor]]
    weight_decay: float
    grad_clip: float

    @classmethod
    def for_adapter(cls, adapter: Adapter, lr: float, weight_decay: float,
                    device: torch.device, precision: str, grad_clip: float) -> Optimisation:
        """Set up the optimizer the trainer uses for ``adapter``.

        Raises:
            InvalidInputError: the mode selected no trainable tensors.
        """
        named = adapter.trainable()
        if not named:
            raise InvalidInputError("this mode selected no trainable tensors")
        anchors = adapter.decay_anchors()
        direct = [(n, p) for n, p in named if n not in anchors]
        offset = [(n, p) for n, p in named if n in anchors]
        groups: list[dict[str, Any]] = []
        if direct:
            groups.append({"params": [p for _, p in direct], "weight_decay": weight_decay})
        if offset:
            # δ = θ − θ0 must decay toward −θ0 so that θ decays toward 0 (see update()).
            groups.append({"params": [p for _, p in offset], "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=weight_decay,
                                      fused=True if device.type == "cuda" else None)
        ordered = direct + offset
        return cls(optimizer=optimizer,
                   scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                   names=[n for n, _ in ordered], params=[p for _, p in ordered],
                   decay_pairs=[(p, anchors[n]) for n, p in offset],
                   weight_decay=weight_decay, grad_clip=grad_clip)

    def update(self, lr: float) -> None:
        """Unscale, clip, decay and step with learning rate ``lr``; then clear gradients."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.decay_pairs and self.weight_decay:
            factor = lr * self.weight_decay
            with torch.no_grad():
                for param, anchor in self.decay_pairs:
                    param.mul_(1.0 - factor).sub_(anchor.to(param.dtype), alpha=factor)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def _workers(config: FinetuneConfig, device: torch.device) -> int:
    if config.workers is not None:
        return config.workers
    return 4 if device.type == "cuda" else 0


def _collate_check(images: Any, labels: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise InvalidInputError("the dataset must yield (image tensor [3, H, W], label) pairs",
                                hint="pass a transform such as the model's preprocess_train")
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    return images, labels.long()


@dataclass
class _Track:
    """How far a run got: loop started, steps done, step of the state saved or resumed from."""

    started: bool = False
    done: int = 0
    saved: int | None = None


def interruption_text(config: FinetuneConfig, state_path: str | None, done: int, total: int,
                      saved: int | None) -> str:
    """What a user needs after Ctrl-C: where the state is and how to continue.

    Args:
        config: The run's configuration.
        state_path: The training-state file (None without ``--workdir``).
        done: Optimizer steps completed.
        total: Steps of the run.
        saved: Step of the state on disk that this run wrote or resumed from (None if none).
    """
    return train_state.interruption_text(done, total, state_path, every=config.checkpoint_every,
                                         workdir=config.workdir, resume=config.resume,
                                         saved=saved)


def train(
    adapter: Adapter,
    head: Tensor,
    dataset: Dataset,
    config: FinetuneConfig,
    *,
    device: torch.device,
    precision: str,
    info: DistInfo = SINGLE_PROCESS,
    fingerprint: str = "",
    progress: Callable[[StepLog], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run the optimisation loop of one fine-tuning job.

    Args:
        adapter: The mode's adapter (moved to ``device`` here).
        head: Frozen zero-shot head ``[classes, dim]``; logits = normalize(features) @ head.T.
        dataset: Training examples ``(image tensor, label)``.
        config: The run's configuration.
        device: Training device.
        precision: Resolved precision (``fp32``, ``bf16`` or ``fp16``).
        info: Process placement (torchrun).
        fingerprint: Base fingerprint, recorded in and checked against the training state.
        progress: Called with a :class:`StepLog` every ``log_every`` steps (main process).
        after_step: Called with the number of completed steps after each step (all processes).
        log: Info lines (main process).
        on_start: Called with the step the loop starts from (0, or a resumed state's step)
            before the first step (main process).

    Returns:
        What happened.

    Raises:
        NumericalError: the loss became NaN or Inf (nothing is written past the last good
            training state).
        InvalidInputError: a resume state that does not match the run.
        UsageError: a batch size that does not split over processes and micro-steps.
        KeyboardInterrupt: Ctrl-C (or SIGTERM), with a note
            (:func:`tvtool.errors.note_interruption`) saying where the training state is and
            how to continue.
    """
    track = _Track()
    try:
        return _train(adapter, head, dataset, config, device=device, precision=precision,
                      info=info, fingerprint=fingerprint, progress=progress,
                      after_step=after_step, log=log, track=track, on_start=on_start)
    except KeyboardInterrupt as exc:
        if not track.started:  # during set-up: nothing was trained or written
            raise
        state_path = os.path.join(config.workdir, RESUME_FILE) if config.workdir else None
        total = total_steps(config, len(dataset))  # type: ignore[arg-type]
        note_interruption(exc, interruption_text(config, state_path, track.done, total,
                                                 track.saved))
        raise


def _train(
    adapter: Adapter,
    head: Tensor,
    dataset: Dataset,
    config: FinetuneConfig,
    *,
    device: torch.device,
    precision: str,
    info: DistInfo = SINGLE_PROCESS,
    fingerprint: str = "",
    progress: Callable[[StepLog], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
    track: _Track | None = None,
    on_start: Callable[[int], None] | None = None,
) -> TrainResult:
    """The loop of :func:`train`; ``track`` follows the steps done and the state saved."""
    size = len(dataset)  # type: ignore[arg-type]
    total = total_steps(config, size)
    warmup = config.warmup_steps if config.warmup_steps is not None else default_warmup(total)
    if config.batch_size % (config.grad_accum * info.world):
        raise UsageError(f"--batch-size {config.batch_size} does not split into "
                         f"{config.grad_accum} micro-steps on {info.world} processes")
    run_key = _run_key(config, fingerprint, total, warmup, size)
    state_path = os.path.join(config.workdir, RESUME_FILE) if config.workdir else None

    adapter.to(device)
    adapter.train()  # BatchNorm statistics stay frozen (Adapter.train)
    buffers = {name: b.detach().clone() for name, b in adapter.encoder.named_buffers()}
    head = head.detach().to(device=device, dtype=torch.float32)
    opt = Optimisation.for_adapter(adapter, config.lr, config.weight_decay, device, precision,
                                   config.grad_clip)
    optimizer, scaler, names = opt.optimizer, opt.scaler, opt.names

    start = 0
    resumed = False
    if config.resume != "no" and state_path is not None:
        if os.path.exists(state_path):
            # auto and yes alike: a state of another run, or a damaged one, is refused (exit
            # 2) and left as it is; only --resume no replaces it.
            start = _load_state(state_path, adapter, names, optimizer, scaler, run_key)
            resumed = True
            if log and info.is_main:
                log(f"resuming from step {start} of {total} ({state_path})")
        elif config.resume == "yes":
            raise InvalidInputError(f"--resume: no training state at {state_path!r}",
                                    hint="use --resume auto to start when there is none")
    if start > total:
        raise InvalidInputError(f"the training state is at step {start}, past the run's {total}")

    model: torch.nn.Module = adapter
    if info.world > 1:
        model = DistributedDataParallel(
            adapter, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    stream = SampleStream(size, config.seed)
    sampler = MicroBatches(stream, config.batch_size, config.grad_accum, info, start, total)
    workers = _workers(config, device)
    loader = DataLoader(SeededSamples(dataset, config.seed), batch_sampler=sampler,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)

    window_loss = torch.zeros((), device=device)
    window_correct = torch.zeros((), device=device, dtype=torch.long)
    window_seen = 0
    window_micro = 0
    diverged = torch.zeros((), device=device, dtype=torch.bool)
    last_checked = start
    last_saved = start if resumed else None
    track = track if track is not None else _Track()
    track.started, track.done, track.saved = True, start, last_saved
    window_start = time.perf_counter()
    run_start = window_start
    last_loss, last_acc, lr = float("nan"), float("nan"), config.lr
    global_batch = config.batch_size
    batches = iter(loader)
    if on_start is not None and info.is_main:
        on_start(start)

    def check_finite(step_done: int) -> None:
        flag = diverged.to(torch.int32)
        if info.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if bool(flag.item()):
            where = f"between steps {last_checked} and {step_done}"
            how = train_state.continue_how(config.resume)
            saved = (f"; the training state of step {last_saved} in {config.workdir} is intact "
                     f"({how})" if last_saved is not None else "")
            raise NumericalError(f"training diverged: the loss became NaN or Inf {where}; "
                                 f"no output was written{saved}",
                                 hint="lower --lr, use --precision fp32 or bf16, or check the data")

    for step in range(start, total):
        lr = learning_rate(step, total, warmup, config.lr)
        for k in range(config.grad_accum):
            images, labels = _collate_check(*next(batches))
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            sync = contextlib.nullcontext()
            if info.world > 1 and k < config.grad_accum - 1:
                sync = model.no_sync()  # type: ignore[operator]
            with sync:
                loss, logits = classification_loss(model, images, labels, head, device,
                                                   precision)
                scaler.scale(loss / config.grad_accum).backward()
            with torch.no_grad():
                detached = loss.detach()
                diverged |= ~torch.isfinite(detached)
                window_loss += detached
                window_correct += (logits.argmax(dim=-1) == labels).sum()
            window_micro += 1
            window_seen += labels.numel()
        opt.update(lr)
        done = track.done = step + 1
        save_now = state_path is not None and done % config.checkpoint_every == 0 and done < total
        if done % config.log_every == 0 or done == total or save_now:
            check_finite(done)
            last_checked = done
            now = time.perf_counter()
            last_loss = float(window_loss.item()) / max(1, window_micro)
            last_acc = float(window_correct.item()) / max(1, window_seen)
            steps_in_window = window_micro / config.grad_accum
            rate = steps_in_window * global_batch / max(now - window_start, 1e-9)
            if progress is not None and info.is_main:
                progress(StepLog(done, total, last_loss, last_acc, lr, rate))
            window_loss.zero_()
            window_correct.zero_()
            window_seen = window_micro = 0
            window_start = now
        if save_now and state_path is not None:
            if info.is_main:
                _save_state(state_path, adapter, names, optimizer, scaler, done, run_key)
            if info.world > 1:
                dist.barrier()
            last_saved = track.saved = done
        if after_step is not None:
            after_step(done)
    check_finite(total)
    _check_buffers_unchanged(adapter, buffers)
    seconds = time.perf_counter() - run_start
    ran = total - start
    return TrainResult(start_step=start, steps=total, seconds=seconds,
                       images_per_s=ran * global_batch / max(seconds, 1e-9),
                       final_loss=last_loss, train_accuracy=last_acc)


def _check_buffers_unchanged(adapter: Adapter, before: Mapping[str, Tensor]) -> None:
    """Fail if training changed an encoder buffer: the task vector would silently lose it."""
    for name, tensor in adapter.encoder.named_buffers():
        if name in before and not torch.equal(tensor, before[name]):
            raise TvtoolError(
                f"the image encoder's buffer {name!r} changed during fine-tuning; the task "
                "vector holds parameters only, so it would not be the trained network",
                hint="this encoder updates state in its forward pass, which tvtool cannot "
                     "fine-tune; please report it")
