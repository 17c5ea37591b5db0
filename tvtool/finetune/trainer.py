"""The fine-tuning command: training loop, checkpoint/resume, DDP, outputs.

Configuration and results: :mod:`tvtool.finetune.config`; processes and the deterministic
example stream: :mod:`tvtool.finetune.sampling`.

The loop is mode-agnostic: a mode's :class:`~tvtool.finetune.base.Adapter` provides the
trainable tensors, the forward pass and the task vector. Everything that decides *which*
examples a step sees is a pure function of (seed, step), so a resumed run, a run with a
different number of processes or data-loader workers, and an uninterrupted run see the same
batches: the global batch of step ``s`` is positions ``[s·B, (s+1)·B)`` of an endless stream
made of one seeded permutation of the dataset per epoch, split evenly over processes and
accumulation micro-steps, and each example's random augmentation is seeded by its position.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from tvtool.device import autocast, resolve_device, resolve_precision
from tvtool.errors import InvalidInputError, NumericalError, TvtoolError, UsageError
from tvtool.finetune.base import Adapter
from tvtool.finetune.config import (
    DEFAULT_STEPS,
    REFERENCE_WARMUP,
    RESUME_FILE,
    STATE_FORMAT,
    FinetuneConfig,
    FinetuneResult,
    StepLog,
    TrainResult,
)
from tvtool.finetune.registry import get_mode
from tvtool.finetune.sampling import (
    SINGLE_PROCESS,
    DistInfo,
    MicroBatches,
    SampleStream,
    SeededSamples,
    dist_from_env,
)
from tvtool.io import check_output, ensure_directory, write_tensors
from tvtool.io.train_state import read_train_state, write_train_state
from tvtool.limits import short_repr
from tvtool.metadata import FileMeta, Kind, Mode, provenance
from tvtool.types import StateDict

# --------------------------------------------------------------------------------------------
# Schedule, devices, processes
# --------------------------------------------------------------------------------------------


def learning_rate(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Reference schedule: linear warm-up to ``base_lr``, then cosine decay to 0.

    Args:
        step: 0-based optimizer step.
        total: Steps in the run.
        warmup: Warm-up steps.
        base_lr: Peak learning rate.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def default_warmup(total: int) -> int:
    """500 steps as in the reference recipe (2000 steps), at most a quarter of shorter runs."""
    return min(REFERENCE_WARMUP, total // 4)


# --------------------------------------------------------------------------------------------
# Training state (resume)
# --------------------------------------------------------------------------------------------


def _run_key(config: FinetuneConfig, fingerprint: str, total: int, warmup: int,
             size: int) -> dict[str, Any]:
    key = config.resume_fields()
    if config.mode is Mode.LLORA:
        # `llora` trained the network-level linearization before it became the per-adapter
        # L-LoRA; a state without this key belongs to that other model and must not resume.
        key["llora"] = "per-adapter"
    key.update(base_fingerprint=fingerprint, total_steps=total, warmup_steps=warmup,
               dataset_size=size)
    return key


def _check_run_key(saved: Mapping[str, Any], current: Mapping[str, Any], path: str) -> None:
    different = [k for k in current if saved.get(k) != current[k]]
    if different:
        detail = ", ".join(f"{k}: {short_repr(saved.get(k), 40)} -> {short_repr(current[k], 40)}"
                           for k in different[:3])
        raise InvalidInputError(
            f"the training state in {path!r} belongs to a different run ({detail})",
            hint="resume with the original settings, or use a new --workdir")


def _python_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_random_state(state: Sequence[Any], rng: Any = random) -> None:
    rng.setstate((int(state[0]), tuple(int(v) for v in state[1]), state[2]))


def _save_state(path: str, adapter: Adapter, names: list[str], optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, step: int, run_key: dict[str, Any]) -> None:
    tensors: StateDict = {}
    params = dict(adapter.trainable())
    for name in names:
        param = params[name]
        tensors[f"param/{name}"] = param.detach()
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, Tensor):
                tensors[f"optim/{name}/{key}"] = value
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = rng
    state = {"format": STATE_FORMAT, "step": step, "run": run_key,
             "scaler": scaler.state_dict() if scaler.is_enabled() else None,
             "python_random": _python_random_state()}
    write_train_state(path, tensors, state)


_REQUIRED_MOMENTS = frozenset({"step", "exp_avg", "exp_avg_sq"})
_KNOWN_MOMENTS = _REQUIRED_MOMENTS | {"max_exp_avg_sq"}


def _damaged(path: str, what: str) -> InvalidInputError:
    return InvalidInputError(f"the training state {path!r} is damaged: {what}",
                             hint="start a new --workdir, or drop --resume")


def _check_state(path: str, tensors: Mapping[str, Tensor], state: Mapping[str, Any],
                 params: Mapping[str, Tensor], total: int) -> None:
    """Validate everything :func:`_load_state` reads, before any of it is applied.

    A state file is written by tvtool, but a damaged or edited one must end in a one-line
    InvalidInputError (exit 2), never in a KeyError deep inside torch.
    """
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total:
        raise _damaged(path, f"'step' must be an integer in [0, {total}], got "
                             f"{short_repr(step, 40)}")
    if not isinstance(state.get("run"), dict):
        raise _damaged(path, "no 'run' record")
    rng = tensors.get("rng/torch_cpu")
    expected = torch.get_rng_state()
    if rng is None or rng.dtype != torch.uint8 or rng.shape != expected.shape:
        found = "missing" if rng is None else f"{rng.dtype} {tuple(rng.shape)}"
        raise _damaged(path, f"RNG state 'rng/torch_cpu' is {found}, expected uint8 "
                             f"{tuple(expected.shape)}")
    moments: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        if key == "rng/torch_cpu":
            continue
        if key.startswith("rng/cuda/"):
            if tensor.dtype != torch.uint8 or tensor.dim() != 1:
                raise _damaged(path, f"malformed CUDA RNG state {key[:80]!r}")
            continue
        if key.startswith("param/") and key[len("param/"):] in params:
            name = key[len("param/"):]
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise _damaged(path, f"tensor {key[:80]!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
            continue
        name, _, moment = key[len("optim/"):].rpartition("/")
        if not key.startswith("optim/") or name not in params or moment not in _KNOWN_MOMENTS:
            raise _damaged(path, f"unexpected tensor {key[:80]!r}")
        shape = (1,) if moment == "step" else tuple(params[name].shape)
        if (tensor.numel() != 1 if moment == "step" else tuple(tensor.shape) != shape) \
                or not tensor.is_floating_point():
            raise _damaged(path, f"optimizer tensor {key[:80]!r} is {tensor.dtype} "
                                 f"{tuple(tensor.shape)}, expected floating {shape}")
        moments.setdefault(name, set()).add(moment)
    missing = sorted(f"param/{n}" for n in params if f"param/{n}" not in tensors)
    missing += sorted(f"optim/{n}/{m}" for n, have in moments.items()
                      for m in _REQUIRED_MOMENTS - have)
    if missing:
        raise _damaged(path, f"missing tensor(s) {short_repr(missing)}")
    python_random = state.get("python_random")
    if python_random:
        try:
            _set_python_random_state(python_random, random.Random())
        except (TypeError, ValueError, IndexError, OverflowError, KeyError):
            raise _damaged(path, "malformed Python RNG state") from None
    if state.get("scaler") is not None and not isinstance(state.get("scaler"), dict):
        raise _damaged(path, "malformed gradient-scaler state")


def _load_state(path: str, adapter: Adapter, names: list[str],
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                run_key: dict[str, Any]) -> int:
    tensors, state = read_train_state(path)
    if state.get("format") != STATE_FORMAT:
        raise InvalidInputError(f"{path!r} has training-state format "
                                f"{short_repr(state.get('format'), 40)}, "
                                f"this tvtool reads {STATE_FORMAT}")
    run = state.get("run")
    _check_run_key(run if isinstance(run, dict) else {}, run_key, path)
    _check_state(path, tensors, state, dict(adapter.trainable()), int(run_key["total_steps"]))
    adapter.load_trainable_state({n: tensors[f"param/{n}"] for n in names
                                  if f"param/{n}" in tensors})
    # Rebuild the optimizer's own state_dict so torch applies its device/dtype rules ("step"
    # lives on the device for fused AdamW, on the CPU otherwise).
    current = optimizer.state_dict()
    order = [i for group in current["param_groups"] for i in group["params"]]
    restored: dict[int, dict[str, Tensor]] = {}
    for index, name in zip(order, names, strict=True):
        moments = {k.rsplit("/", 1)[1]: v for k, v in tensors.items()
                   if k.startswith(f"optim/{name}/")}
        if moments:
            restored[index] = moments
    optimizer.load_state_dict({"state": restored, "param_groups": current["param_groups"]})
    if scaler.is_enabled() and state.get("scaler"):
        try:
            scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise _damaged(path, "malformed gradient-scaler state") from exc
    torch.set_rng_state(tensors["rng/torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    if state.get("python_random"):
        _set_python_random_state(state["python_random"])
    return int(state["step"])


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


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


def total_steps(config: FinetuneConfig, dataset_size: int) -> int:
    """Optimizer steps of the run (from ``steps``, ``epochs`` or the 2000-step default)."""
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * dataset_size / config.batch_size))
    return DEFAULT_STEPS


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

    Returns:
        What happened.

    Raises:
        NumericalError: the loss became NaN or Inf (nothing is written past the last good
            training state).
        InvalidInputError: a resume state that does not match the run.
        UsageError: a batch size that does not split over processes and micro-steps.
    """
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
    if config.resume and state_path is not None:
        if not os.path.exists(state_path):
            raise InvalidInputError(f"--resume: no training state at {state_path!r}",
                                    hint="drop --resume to start a new run")
        start = _load_state(state_path, adapter, names, optimizer, scaler, run_key)
        if log and info.is_main:
            log(f"resuming from step {start} of {total} ({state_path})")
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
    last_saved = start if config.resume else None
    window_start = time.perf_counter()
    run_start = window_start
    last_loss, last_acc, lr = float("nan"), float("nan"), config.lr
    global_batch = config.batch_size
    batches = iter(loader)

    def check_finite(step_done: int) -> None:
        flag = diverged.to(torch.int32)
        if info.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if bool(flag.item()):
            where = f"between steps {last_checked} and {step_done}"
            saved = (f"; the training state of step {last_saved} in {config.workdir} is intact "
                     "(--resume continues from it)" if last_saved is not None else "")
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
        done = step + 1
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
            last_saved = done
        if after_step is not None:
            after_step(done)
    check_finite(total)
    _check_buffers_unchanged(adapter, buffers)
    seconds = time.perf_counter() - run_start
    ran = total - start
    return TrainResult(start_step=start, steps=total, seconds=seconds,
                       images_per_s=ran * global_batch / max(seconds, 1e-9),
                       final_loss=last_loss, train_accuracy=last_acc)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _quiet(_: str) -> None:
    return None


def check_encoder(mode: Mode, encoder: torch.nn.Module, options: Any) -> None:
    """Refuse a mode the image encoder's structure does not support (works on meta tensors).

    Each mode says what it needs (``check_encoder`` of its mode object): ``full`` and
    ``linear`` train any encoder; ``attn`` needs attention blocks (``nn.MultiheadAttention``
    or timm attention); the LoRA modes need ``nn.MultiheadAttention`` blocks (open_clip's
    own ViTs).

    Raises:
        InvalidInputError: the encoder lacks what the mode trains.
    """
    get_mode(mode).check_encoder(encoder, options)


def _check_buffers_unchanged(adapter: Adapter, before: Mapping[str, Tensor]) -> None:
    """Fail if training changed an encoder buffer: the task vector would silently lose it."""
    for name, tensor in adapter.encoder.named_buffers():
        if name in before and not torch.equal(tensor, before[name]):
            raise TvtoolError(
                f"the image encoder's buffer {name!r} changed during fine-tuning; the task "
                "vector holds parameters only, so it would not be the trained network",
                hint="this encoder updates state in its forward pass, which tvtool cannot "
                     "fine-tune; please report it")


def _init_process_group(info: DistInfo, device_kind: str) -> bool:
    if info.world <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return True


def _write_checkpoint(path: str, ref: Any, dense: Mapping[str, Tensor],
                      meta: FileMeta, inputs: Sequence[str]) -> None:
    from tvtool.io import TensorInfo
    from tvtool.models import base_source

    source, _ = base_source(ref)
    try:
        names = source.keys()
        layout = [TensorInfo(n, source.info(n).dtype, source.info(n).shape) for n in names]

        def tensors() -> Iterator[tuple[str, Tensor]]:
            for name in names:
                tensor = source.get(name)
                if name in dense:
                    tensor = (tensor.double() + dense[name].double()).to(tensor.dtype)
                yield name, tensor

        write_tensors(path, tensors(), meta.to_header(), layout=layout, inputs=inputs)
    finally:
        source.close()


def finetune(
    config: FinetuneConfig,
    *,
    dataset: Dataset | None = None,
    head: Tensor | None = None,
    progress: Callable[[StepLog], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
    on_trained: Callable[[Adapter], None] | None = None,
) -> FinetuneResult:
    """Fine-tune the image encoder of ``config.base`` and write the task vector.

    Under torchrun every process calls this; process 0 writes the outputs.

    Args:
        config: What to do.
        dataset: Training examples; default ``tvtool.data.load_split(config.dataset, "train",
            preprocess_train)``.
        head: Zero-shot head; default built from the dataset's class names and templates.
        progress: Progress callback (see :func:`train`).
        after_step: Per-step callback (see :func:`train`).
        log: Info lines (stderr in the CLI).
        on_trained: Called on every process with the trained adapter, before the outputs
            are written (e.g. to evaluate in-process).

    Returns:
        The run summary.

    Raises:
        UsageError, InvalidInputError: bad configuration, inputs or resume state.
        NumericalError: the run diverged (no output written).
    """
    from tvtool.models import (
        base_source,
        build_zero_shot_head,
        fingerprint,
        image_encoder_skeleton,
        load_clip,
        resolve_ref,
    )
    from tvtool.models.refs import RefKind

    info = dist_from_env()
    say = log if log is not None and info.is_main else _quiet
    device = resolve_device(config.device, info.local_rank if info.world > 1 else None)
    precision = resolve_precision(config.precision, device)
    mode = get_mode(config.mode)
    # Refusals that depend only on the architecture come first, from a weightless skeleton of
    # the image encoder, not after minutes of loading weights and building the head.
    ref = resolve_ref(config.base)
    skeleton = image_encoder_skeleton(ref.architecture)
    if skeleton is not None:
        check_encoder(config.mode, skeleton, config.options)
    owns_group = _init_process_group(info, device.type)
    try:
        source, ref = base_source(ref)
        try:
            base_fp = fingerprint(source)
        finally:
            source.close()
        inputs = [ref.location or ref.text] if ref.kind in (RefKind.CHECKPOINT,
                                                              RefKind.WEIGHTS_FILE) else []
        if info.is_main:
            check_output(config.output, inputs)
            if config.checkpoint_out is not None:
                check_output(config.checkpoint_out, inputs)
            if config.workdir:
                ensure_directory(config.workdir)
                if not config.resume and os.path.exists(os.path.join(config.workdir,
                                                                     RESUME_FILE)):
                    say(f"note: {config.workdir} holds the training state of an earlier run; "
                        "it will be replaced (pass --resume to continue that run instead)")
        if info.world > 1:
            dist.barrier()
        torch.manual_seed(config.seed)
        bundle = load_clip(ref, device)
        if skeleton is None:
            check_encoder(config.mode, cast(torch.nn.Module, bundle.model.visual),
                          config.options)
        if dataset is None:
            from tvtool.data import load_split

            dataset = load_split(config.dataset, "train", bundle.preprocess_train,
                                 data_root=config.data_root, seed=config.seed)
        if head is None:
            spec = getattr(dataset, "spec", None)
            if spec is None:
                raise InvalidInputError("the dataset has no .spec (class names and templates)",
                                        hint="pass a zero-shot head explicitly")
            head = build_zero_shot_head(bundle, spec.classnames, spec.templates, device)
        encoder = cast(torch.nn.Module, bundle.model.visual)
        architecture = bundle.architecture
        del bundle  # drop the text tower: only the image encoder trains
        adapter = mode.build(encoder, config.options, seed=config.seed)
        say(f"fine-tuning {architecture} ({mode.name.value}: {mode.summary}) on "
            f"{config.dataset}, {len(dataset)} examples, {device}, {precision}"  # type: ignore[arg-type]
            + (f", {info.world} processes" if info.world > 1 else ""))
        result = train(adapter, head, dataset, config, device=device, precision=precision,
                       info=info, fingerprint=base_fp, progress=progress,
                       after_step=after_step, log=say)
        if on_trained is not None:
            on_trained(adapter)
        vector = adapter.task_vector()
        from tvtool.data import recorded_dataset_name

        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=architecture, base_ref=config.base,
                        base_fingerprint=base_fp, mode=config.mode, linearized=mode.linearized,
                        dataset=(recorded_dataset_name(config.dataset) if config.dataset
                                 else config.dataset),
                        provenance=provenance("finetune", {**config.as_json(),
                                                           "precision_resolved": precision,
                                                           "world_size": info.world},
                                              seed=config.seed),
                        extra=adapter.vector_metadata())
        if info.is_main:
            write_tensors(config.output, vector, meta.to_header(), inputs=inputs)
            if config.checkpoint_out is not None:
                ckpt_meta = meta.with_changes(kind=Kind.CHECKPOINT, linearized=False, extra={})
                _write_checkpoint(config.checkpoint_out, ref, adapter.dense_delta(), ckpt_meta,
                                  inputs)
        if info.world > 1:
            dist.barrier()
        return FinetuneResult(
            output=config.output, checkpoint_out=config.checkpoint_out, mode=config.mode.value,
            linearized=mode.linearized, dataset=config.dataset, steps=result.steps,
            resumed_from=result.start_step, seconds=result.seconds,
            images_per_s=result.images_per_s, final_loss=result.final_loss,
            train_accuracy=result.train_accuracy, tensors=len(vector),
            parameters=sum(t.numel() for t in vector.values()), device=str(device),
            precision=precision, world_size=info.world)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
