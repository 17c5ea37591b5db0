"""Contrastive pre-training of the embedded ``tvtool-tiny`` CLIP on the synthetic corpus.

The result is the base model every offline example, test and demo starts from. The
recipe is plain CLIP: symmetric cross-entropy over image-text similarities with a learned
temperature, AdamW, linear warm-up then cosine decay, gradient clipping. It runs on a
2-core CPU in a few minutes (see docs/embedded-world.md for measured numbers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tvtool.errors import UsageError
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
                  progress: Callable[[int, float], None] | None = None) -> StateDict:
    """Pre-train an embedded CLIP (``config.model``) contrastively on the synthetic corpus (CPU).

    Args:
        config: Training settings (defaults: the recipe of the embedded weights).
        progress: Called after every step with ``(step_index, loss)``.

    Returns:
        The trained open_clip state dict (float32, CPU). A diverged run shows as a NaN loss
        in ``progress``; :func:`write_pretrained` refuses to write its weights.
    """
    config = config or PretrainConfig()
    # Seed torch without disturbing the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _pretrain(config, progress)


def _pretrain(config: PretrainConfig, progress: Callable[[int, float], None] | None,
              ) -> StateDict:
    bundle = load_clip(f"{config.model}:random")
    # open_clip's CLIP (encode_image, encode_text, logit_scale), typed as a plain Module.
    model: Any = bundle.model.train()
    mean, std = normalization(bundle.preprocess_eval)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    rng = rng_for("tvtool-world", STREAM_VERSION, "corpus", config.seed)
    for step in range(config.steps):
        images, texts = corpus_batch(rng, config.batch, config.caption_noise)
        _, text_ids = np.unique(np.asarray(texts), return_inverse=True)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        image_features = F.normalize(model.encode_image(images_to_tensor(images, mean, std)),
                                     dim=-1)
        text_features = F.normalize(model.encode_text(bundle.tokenizer(texts)), dim=-1)
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
    model.eval()
    return {name: tensor.detach().clone().contiguous() for name, tensor in
            model.state_dict().items()}


def pretrain_metadata(config: PretrainConfig, command: str = "pretrain") -> dict[str, str]:
    """Build the safetensors header of a pre-trained ``tvtool-tiny`` checkpoint."""
    arguments = dataclasses.asdict(config)
    arguments["generator_version"] = GENERATOR_VERSION
    meta = FileMeta(kind=Kind.CHECKPOINT, architecture=config.model,
                    provenance=provenance(command, arguments, seed=config.seed))
    return meta.to_header()


def write_pretrained(state: StateDict, output: str, config: PretrainConfig,
                     inputs: Sequence[str] = ()) -> None:
    """Write pre-trained weights as a tvtool checkpoint (atomic; ``-`` is stdout).

    Raises:
        NumericalError: the weights contain NaN or Inf (nothing is written).
        InvalidInputError: the output directory is missing or the output is an input.
    """
    from tvtool.io import write_tensors

    write_tensors(output, state, pretrain_metadata(config), inputs=inputs)
