"""Contrastive pre-training of the embedded ``tvtool-tiny`` CLIP on the synthetic corpus.

The result is the base model every offline example, test and demo starts from. The
recipe is plain CLIP: symmetric cross-entropy over image-text similarities with a learned
temperature, AdamW, linear warm-up then cosine decay, gradient clipping. It runs on a
2-core CPU in a few minutes (see docs/embedded-world.md for measured numbers).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tvtool.errors import InvalidInputError, UsageError, note_interruption
from tvtool.io.train_state import (
    RESUME_CHOICES,
    check_run_key,
    check_training_tensors,
    checked_step,
    damaged_state,
    interruption_text,
    optimizer_tensors,
    read_train_state,
    restore_optimizer,
    write_train_state,
)
from tvtool.limits import short_repr
from tvtool.metadata import FileMeta, Kind, provenance
from tvtool.models import EMBEDDED_MODELS, TINY_MODEL, load_clip
from tvtool.synthetic_world.scenes import rng_for
from tvtool.synthetic_world.tasks import GENERATOR_VERSION, STREAM_VERSION, corpus_batch
from tvtool.types import StateDict

_MAX_LOGIT_SCALE = math.log(100.0)
# Each embedded model's recipe where it differs from the defaults. The world ablation
# (docs/embedded-world.md) measured that a longer pre-training and a wider image encoder are
# the levers that let task addition work; the width-256 encoder of tvtool-base trains badly at
# the narrower models' peak rate (zero-shot 43 % against 67 % at half the rate), as wider
# transformers need smaller rates.
_RECIPES: dict[str, dict[str, Any]] = {
    "tvtool-small": {"steps": 3000},
    "tvtool-base": {"steps": 3000, "lr": 1e-3},
}


PRETRAIN_STATE_FILE = "pretrain-state.safetensors"
"""The training state a resumable pre-training run keeps in its work directory."""
PRETRAIN_STATE_FORMAT = 1


@dataclass(frozen=True)
class PretrainCheckpoints:
    """Where a pre-training run keeps its training state, how often, and whether it resumes.

    Attributes:
        workdir: Directory of the state file (:data:`PRETRAIN_STATE_FILE`).
        every: Optimiser steps between saves.
        resume: ``auto`` continues a state of the same run and starts when there is none,
            ``yes`` requires one, ``no`` starts over and replaces it (:data:`RESUME_CHOICES`).
    """

    workdir: str
    every: int = 250
    resume: str = "auto"

    def __post_init__(self) -> None:
        if self.every < 1:
            raise UsageError(f"--checkpoint-every must be >= 1, got {self.every}")
        if self.resume not in RESUME_CHOICES:
            raise UsageError(f"--resume must be {', '.join(RESUME_CHOICES)}, not "
                             f"{short_repr(self.resume, 40)}")

    @property
    def path(self) -> str:
        """The state file."""
        return os.path.join(self.workdir, PRETRAIN_STATE_FILE)


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of :func:`pretrain_tiny` (also the ``tvtool pretrain`` options).

    Attributes:
        steps: Optimiser steps; each sees a fresh batch of generated image-caption pairs.
        batch: Pairs per step (contrastive negatives come from the same batch).
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay on matrices (not on biases, norms, embeddings).
        warmup: Linear warm-up steps before the cosine decay to zero.
        grad_clip: Maximum global gradient norm.
        seed: Seeds the corpus stream (the initial weights are ``<model>:random``).
        caption_noise: Probability that a caption names a wrong value
            (see :func:`tvtool.synthetic_world.domains.domain_captions`).
        model: Which embedded open_clip config to pre-train (``tvtool-tiny``, the unit
            tests' model, ``tvtool-small``, the demo's, or ``tvtool-base``, the results').
    """

    steps: int = 1500
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    caption_noise: float = 0.15
    model: str = TINY_MODEL

    @classmethod
    def recipe(cls, model: str = TINY_MODEL) -> PretrainConfig:
        """The recipe of ``model``'s embedded weights.

        ``tvtool-small`` and ``tvtool-base`` train twice as long as ``tvtool-tiny``,
        ``tvtool-base`` at half the peak learning rate.
        """
        return cls(model=model, **_RECIPES.get(model, {}))

    def __post_init__(self) -> None:
        if self.model not in EMBEDDED_MODELS:
            raise UsageError(f"can only pre-train an embedded model "
                             f"({', '.join(EMBEDDED_MODELS)}), got {self.model!r}")
        if self.steps < 1 or self.batch < 2:
            raise UsageError(f"pretraining needs steps >= 1 and batch >= 2 "
                             f"(got steps={self.steps}, batch={self.batch})")
        if not self.lr > 0:
            raise UsageError(f"learning rate must be positive, got {self.lr}")


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor, text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE loss of CLIP.

    Args:
        image_features: ``[B, D]`` unit-norm image embeddings.
        text_features: ``[B, D]`` unit-norm text embeddings, row ``i`` paired with image ``i``.
        logit_scale: Log of the temperature multiplier.
        text_ids: Optional ``[B]`` ids of the caption strings; pairs whose captions are
            identical count as positives of each other (short synthetic captions repeat, and
            calling a repeat a negative would teach the model to tell identical texts apart).

    Returns:
        Scalar loss.
    """
    logits = logit_scale.exp() * image_features @ text_features.T
    if text_ids is None:
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    same = (text_ids[:, None] == text_ids[None, :]).to(logits.dtype)
    target_soft = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target_soft) + F.cross_entropy(logits.T, target_soft))


def normalization(transform: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the ``Normalize`` step of an open_clip preprocessing pipeline.

    Generated images skip PIL and are normalised in one tensor op, which must match what the
    model's own evaluation transform does to a PIL image.

    Returns:
        ``(mean, std)`` shaped ``[1, 3, 1, 1]``.
    """
    for step in getattr(transform, "transforms", [transform]):
        if hasattr(step, "mean") and hasattr(step, "std"):
            mean = torch.tensor(step.mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(step.std, dtype=torch.float32).view(1, 3, 1, 1)
            return mean, std
    raise ValueError("the transform has no Normalize step")


def images_to_tensor(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` images to a normalised ``float32 [N, 3, H, W]`` batch."""
    # torch.tensor copies, so read-only (cached) arrays are fine.
    x = torch.tensor(images, dtype=torch.uint8).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        embedding = "embedding" in name
        (decay if param.ndim >= 2 and not embedding else rest).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def learning_rate_at(step: int, config: PretrainConfig) -> float:
    """The learning rate of 0-based ``step``: linear warm-up, then cosine decay to 0."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain_tiny(config: PretrainConfig | None = None,
                  progress: Callable[[int, float], None] | None = None,
                  checkpoints: PretrainCheckpoints | None = None,
                  on_start: Callable[[int], None] | None = None,
                  log: Callable[[str], None] | None = None) -> StateDict:
    """Pre-train an embedded CLIP (``config.model``) contrastively on the synthetic corpus (CPU).

    The weights are a function of the config, the torch build, the CPU and torch's thread
    count: float32 reductions split across threads add in another order, so two thread counts
    give weights that differ in the last bits within a few steps.

    Args:
        config: Training settings (defaults: the recipe of the embedded weights).
        progress: Called after every step with ``(step_index, loss)``.
        checkpoints: Save the training state (weights, AdamW moments, corpus stream and RNG
            positions) every ``checkpoints.every`` steps and continue a saved one; a resumed
            run ends with the same weights as an uninterrupted one.
        on_start: Called once with the step the loop starts from (0, or the resumed step).
        log: Receives a note when a resumed state was trained on another thread count (the
            run continues, but cannot end bit for bit at an uninterrupted run's weights).

    Returns:
        The trained open_clip state dict (float32, CPU). A diverged run shows as a NaN loss
        in ``progress``; :func:`write_pretrained` refuses to write its weights.

    Raises:
        InvalidInputError: a training state of another run, a damaged one, or none with
            ``resume="yes"``.
    """
    config = config or PretrainConfig()
    # Seed torch without disturbing the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _pretrain(config, progress, checkpoints, on_start, log)


def _run_key(config: PretrainConfig) -> dict[str, Any]:
    return {**dataclasses.asdict(config), "generator_version": GENERATOR_VERSION,
            "stream_version": STREAM_VERSION}


def _save_state(path: str, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                rng: np.random.Generator, step: int, config: PretrainConfig) -> None:
    tensors = optimizer_tensors(params, optimizer)
    tensors["rng/torch_cpu"] = torch.get_rng_state()
    write_train_state(path, tensors, {"format": PRETRAIN_STATE_FORMAT, "step": step,
                                      "run": _run_key(config),
                                      "corpus_rng": rng.bit_generator.state,
                                      "torch_threads": torch.get_num_threads()})


def _load_state(path: str, params: dict[str, nn.Parameter], names: list[str],
                optimizer: torch.optim.Optimizer, rng: np.random.Generator,
                config: PretrainConfig, log: Callable[[str], None] | None) -> int:
    """Check the state in ``path`` against this run, then apply it; returns its step."""
    tensors, state = read_train_state(path)
    if state.get("format") != PRETRAIN_STATE_FORMAT:
        raise damaged_state(path, f"format {short_repr(state.get('format'), 40)}, expected "
                                  f"the pre-training state format {PRETRAIN_STATE_FORMAT}")
    saved = state.get("run")
    check_run_key(saved if isinstance(saved, dict) else {}, _run_key(config), path,
                  what="pre-training run")
    step = checked_step(path, state, config.steps)
    check_training_tensors(path, tensors, params)
    corpus_rng = state.get("corpus_rng")
    try:
        if not isinstance(corpus_rng, dict):
            raise TypeError(corpus_rng)
        rng.bit_generator.state = corpus_rng
    except (TypeError, ValueError, KeyError, OverflowError):
        raise damaged_state(path, "malformed corpus stream state 'corpus_rng'") from None
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"param/{name}"])
    restore_optimizer(optimizer, names, tensors)
    torch.set_rng_state(tensors["rng/torch_cpu"])
    saved_threads = state.get("torch_threads")
    if log is not None and isinstance(saved_threads, int) \
            and saved_threads != torch.get_num_threads():
        log(f"note: the state in {path} was trained on {saved_threads} torch threads and this "
            f"run uses {torch.get_num_threads()}: it continues, but its weights will differ in "
            f"the last bits from an uninterrupted run's (--threads {saved_threads} matches)")
    return step


def _pretrain(config: PretrainConfig, progress: Callable[[int, float], None] | None,
              checkpoints: PretrainCheckpoints | None,
              on_start: Callable[[int], None] | None,
              log: Callable[[str], None] | None) -> StateDict:
    bundle = load_clip(f"{config.model}:random")
    # open_clip's CLIP (encode_image, encode_text, logit_scale), typed as a plain Module.
    model: Any = bundle.model.train()
    mean, std = normalization(bundle.preprocess_eval)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    name_of = {id(param): name for name, param in params.items()}
    names = [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]
    rng = rng_for("tvtool-world", STREAM_VERSION, "corpus", config.seed)
    start = 0
    if checkpoints is not None and checkpoints.resume != "no":
        if os.path.exists(checkpoints.path):
            start = _load_state(checkpoints.path, params, names, optimizer, rng, config, log)
        elif checkpoints.resume == "yes":
            raise InvalidInputError(f"--resume: no pre-training state at {checkpoints.path!r}",
                                    hint="use --resume auto to start when there is none")
    if on_start is not None:
        on_start(start)
    saved = start if start else None
    done = start
    try:
        for done in range(start + 1, config.steps + 1):
            _train_step(model, bundle.tokenizer, optimizer, rng, mean, std, done - 1, config,
                        progress)
            if checkpoints is not None and done % checkpoints.every == 0 \
                    and done < config.steps:
                _save_state(checkpoints.path, params, optimizer, rng, done, config)
                saved = done
    except KeyboardInterrupt as exc:
        note_interruption(exc, interruption_text(done - 1, config.steps) if checkpoints is None
                          else interruption_text(done - 1, config.steps, checkpoints.path,
                                                 every=checkpoints.every,
                                                 workdir=checkpoints.workdir,
                                                 resume=checkpoints.resume, saved=saved))
        raise
    model.eval()
    return {name: tensor.detach().clone().contiguous() for name, tensor in
            model.state_dict().items()}


def _train_step(model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer,
                rng: np.random.Generator, mean: torch.Tensor, std: torch.Tensor, step: int,
                config: PretrainConfig, progress: Callable[[int, float], None] | None) -> None:
    """One optimiser step on a fresh corpus batch (0-based ``step`` sets the learning rate)."""
    images, texts = corpus_batch(rng, config.batch, config.caption_noise)
    _, text_ids = np.unique(np.asarray(texts), return_inverse=True)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(step, config)
    image_features = F.normalize(model.encode_image(images_to_tensor(images, mean, std)),
                                 dim=-1)
    text_features = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    loss = clip_loss(image_features, text_features, model.logit_scale,
                     torch.from_numpy(text_ids.reshape(-1)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, _MAX_LOGIT_SCALE)
    if progress is not None:
        progress(step, float(loss.detach()))


def pretrain_metadata(config: PretrainConfig, command: str = "pretrain",
                      threads: int | None = None) -> dict[str, str]:
    """Build the safetensors header of a pre-trained embedded checkpoint.

    Args:
        config: The run's settings.
        command: The subcommand recorded in the provenance.
        threads: The torch thread count the run trained on, recorded as ``torch_threads``
            because the weights depend on it (:func:`pretrain_tiny`).
    """
    arguments: dict[str, Any] = dataclasses.asdict(config)
    arguments["generator_version"] = GENERATOR_VERSION
    if threads is not None:
        arguments["torch_threads"] = threads
    meta = FileMeta(kind=Kind.CHECKPOINT, architecture=config.model,
                    provenance=provenance(command, arguments, seed=config.seed))
    return meta.to_header()


def write_pretrained(state: StateDict, output: str, config: PretrainConfig,
                     inputs: Sequence[str] = (), threads: int | None = None) -> None:
    """Write pre-trained weights as a tvtool checkpoint (atomic; ``-`` is stdout).

    Raises:
        NumericalError: the weights contain NaN or Inf (nothing is written).
        InvalidInputError: the output directory is missing or the output is an input.
    """
    from tvtool.io import write_tensors

    write_tensors(output, state, pretrain_metadata(config, threads=threads), inputs=inputs)
