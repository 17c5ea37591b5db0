"""Zero-shot classification heads built from the text encoder."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch

from tvtool.errors import InvalidInputError
from tvtool.limits import short_repr
from tvtool.models.loading import ClipBundle

TEXTS_PER_BATCH = 256
"""Prompts encoded per forward pass of the text tower: memory stays bounded whatever the
numbers of classes and templates."""


def _prompts(classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]],
             ) -> Iterator[tuple[int, str]]:
    """``(class index, prompt)`` for every class and template, class by class."""
    for index, name in enumerate(classnames):
        for template in templates:
            yield index, (template.format(name) if isinstance(template, str)
                          else template(name))


def build_zero_shot_head(
    bundle: ClipBundle,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Build a zero-shot head: one unit-norm text embedding per class, scaled by the logit scale.

    Row ``c`` is ``exp(logit_scale) · normalize(mean_t normalize(text(template_t(c))))``, the
    prompt ensemble of CLIP (Radford et al., 2021) as open_clip's
    ``build_zero_shot_classifier`` computes it; prompts are encoded
    :data:`TEXTS_PER_BATCH` at a time. Logits are ``normalize(image_features) @ head.T``.

    Args:
        bundle: The CLIP model whose text tower embeds the prompts.
        classnames: Class names in label order.
        templates: Prompt templates (``"a photo of a {}."`` strings or callables).
        device: Device for the text forward passes.

    Returns:
        A ``[num_classes, embed_dim]`` float32 tensor on CPU.

    Raises:
        InvalidInputError: no class or no template; two classes whose prompts the tokenizer
            turns into the same tokens (e.g. names differing only in case, for CLIP's
            lower-casing tokenizer), which no head could tell apart.
    """
    if not classnames or not templates:
        raise InvalidInputError("a zero-shot head needs at least one class and one template")
    model = cast(Any, bundle.model)  # open_clip's CLIP: encode_text, logit_scale
    sums: torch.Tensor | None = None
    digests = [hashlib.sha256() for _ in classnames]
    pending: list[tuple[int, str]] = []

    def encode(batch: list[tuple[int, str]]) -> None:
        nonlocal sums
        tokens = bundle.tokenizer([text for _, text in batch])
        rows = torch.tensor([index for index, _ in batch])
        for index, row in zip(rows.tolist(), tokens, strict=True):
            digests[index].update(row.to(torch.int64).numpy().tobytes())
        embedded = model.encode_text(tokens.to(device), normalize=True).float().cpu()
        if sums is None:
            sums = torch.zeros(len(classnames), embedded.shape[1])
        sums.index_add_(0, rows, embedded)

    with torch.no_grad():
        for item in _prompts(classnames, templates):
            pending.append(item)
            if len(pending) == TEXTS_PER_BATCH:
                encode(pending)
                pending = []
        if pending:
            encode(pending)
        assert sums is not None
        weights = sums / len(templates)
        weights = weights / weights.norm(dim=1, keepdim=True)
        logit_scale = model.logit_scale
        assert isinstance(logit_scale, torch.Tensor)
        scale = logit_scale.detach().exp().float().cpu()
    seen: dict[bytes, int] = {}
    for index, digest in enumerate(digests):
        first = seen.setdefault(digest.digest(), index)
        if first != index:
            raise InvalidInputError(
                f"classes {first} ({short_repr(classnames[first], 40)}) and {index} "
                f"({short_repr(classnames[index], 40)}) give the same prompts once tokenized; "
                "their zero-shot classes would be identical",
                hint="give the classes distinct names (the CLIP tokenizer ignores case and "
                     "extra spaces)")
    return (scale * weights).detach()
