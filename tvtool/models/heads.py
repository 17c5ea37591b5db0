"""Zero-shot classification heads built from the text encoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch

from tvtool.models.loading import ClipBundle


def build_zero_shot_head(
    bundle: ClipBundle,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Build a zero-shot head: one unit-norm text embedding per class, scaled by the logit scale.

    Logits are ``normalize(image_features) @ head.T``.

    Args:
        bundle: The CLIP model whose text tower embeds the prompts.
        classnames: Class names in label order.
        templates: Prompt templates (``"a photo of a {}."`` strings or callables).
        device: Device for the text forward passes.

    Returns:
        A ``[num_classes, embed_dim]`` float32 tensor on CPU.
    """
    model = bundle.model
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            model, tokenizer=bundle.tokenizer, classnames=list(classnames),
            templates=list(templates), num_classes_per_batch=16, device=device, use_tqdm=False,
        )
        logit_scale = model.logit_scale
        assert isinstance(logit_scale, torch.Tensor)
        scale = logit_scale.exp().float()
    return (scale * weights.float().T).detach().to("cpu")
