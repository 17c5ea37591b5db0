"""Captions for the pre-training corpus: partial, sometimes wrong, like alt-text.

Each caption names only some factors of its scene and names a factor wrongly now and then.
That keeps what the tiny CLIP learns from the corpus *partial*: zero-shot transfer to the
downstream tasks is above chance but leaves clear room for fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvtool.world.scenes import Scenes
from tvtool.world.vocab import (
    COLORS,
    COUNTS,
    DIGIT_KIND,
    DIGITS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    plural,
)

_PREFIXES = ("a photo of", "an image of", "a picture of", "")
_GENERIC_NOUNS = ("shape", "object")


@dataclass(frozen=True)
class CaptionStyle:
    """How much of a scene a caption tells, and how reliably.

    Attributes:
        p_shape: Probability of naming the object kind (shape name, or "digit N").
        p_color: Probability of naming the colour.
        p_size: Probability of naming the size.
        p_count: Probability of naming the count as a number word.
        p_position: Probability of naming the position (single objects only).
        p_texture: Probability of naming the background texture.
        noise: Probability that a named factor is replaced by a wrong value.
    """

    p_shape: float = 0.85
    p_color: float = 0.5
    p_size: float = 0.5
    p_count: float = 0.5
    p_position: float = 0.5
    p_texture: float = 0.8
    noise: float = 0.1


def captions(scenes: Scenes, rng: np.random.Generator,
             style: CaptionStyle | None = None) -> list[str]:
    """Write one caption per scene, e.g. ``"a photo of two small red circles"``.

    Args:
        scenes: The scenes to describe.
        rng: Decides which factors are named and which are mislabelled.
        style: Inclusion probabilities and noise rate.

    Returns:
        ``len(scenes)`` lowercase captions.
    """
    style = style or CaptionStyle()
    n = len(scenes)
    probs = np.array([style.p_shape, style.p_color, style.p_size, style.p_count,
                      style.p_position, style.p_texture])
    named = rng.random((n, probs.size)) < probs
    wrong = rng.random((n, probs.size)) < style.noise
    # A random value that differs from the true one: shift by 1..k-1 modulo k.
    shift = rng.random((n, probs.size))
    prefix = rng.integers(0, len(_PREFIXES), size=n)
    generic = rng.integers(0, len(_GENERIC_NOUNS), size=n)

    def value(i: int, slot: int, true: int, k: int) -> int:
        if not wrong[i, slot] or k < 2:
            return true
        return (true + 1 + int(shift[i, slot] * (k - 1))) % k

    out = []
    for i in range(n):
        kind = int(scenes.kind[i])
        count = int(scenes.count[i])
        if named[i, 3] and kind != DIGIT_KIND:
            count = value(i, 3, count - 1, len(COUNTS)) + 1
            determiner = COUNTS[count - 1]
        else:
            determiner = "a" if count == 1 else "some"
        words = []
        if named[i, 2]:
            words.append(SIZES[value(i, 2, int(scenes.size[i]), len(SIZES))])
        if named[i, 1]:
            words.append(COLORS[value(i, 1, int(scenes.color[i]), len(COLORS))])
        if kind == DIGIT_KIND:
            digit = value(i, 0, int(scenes.digit[i]), len(DIGITS))
            words.append(f"digit {DIGITS[digit]}" if named[i, 0] else "digit")
        else:
            noun = (SHAPES[value(i, 0, kind, len(SHAPES))] if named[i, 0]
                    else _GENERIC_NOUNS[generic[i]])
            words.append(noun if count == 1 else plural(noun))
        if determiner == "a" and words[0][0] in "aeiou":
            determiner = "an"
        phrase = [_PREFIXES[prefix[i]], determiner, *words]
        if named[i, 4] and int(scenes.position[i]) >= 0:
            phrase.append("in the " + POSITIONS[value(i, 4, int(scenes.position[i]),
                                                      len(POSITIONS))])
        if named[i, 5]:
            phrase.append(f"on a {TEXTURES[value(i, 5, int(scenes.texture[i]), len(TEXTURES))]} "
                          "background")
        if sum(len(part.split()) for part in phrase) > 12:
            # Long captions would overflow tvtool-tiny's 16-token context and lose their end.
            phrase[0] = ""
        out.append(" ".join(p for p in phrase if p))
    return out
