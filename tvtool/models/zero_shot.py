"""open_clip's zero-shot metadata (class names and prompt templates)."""

from __future__ import annotations

from open_clip import zero_shot_metadata


def imagenet_zero_shot() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ImageNet's 1,000 CLIP class names (label order) and OpenAI's 80 prompt templates.

    The templates are open_clip's callables ``lambda c: f"a photo of a {c}."``; they are
    turned into ``{}`` format strings here.
    """
    classnames = tuple(zero_shot_metadata.IMAGENET_CLASSNAMES)
    templates = tuple(template("{}") for template in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
    return classnames, templates
