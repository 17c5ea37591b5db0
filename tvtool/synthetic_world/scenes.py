"""Scene sampling: factor values plus the nuisance that makes each image unique.

A :class:`Scenes` batch is a struct of arrays, so sampling and rendering thousands of scenes
is a handful of vectorised numpy calls rather than a Python loop per image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tvtool.synthetic_world.vocab import (
    COLOR_RGB,
    COLORS,
    DIGIT_EXTRA_RADIUS,
    DIGIT_KIND,
    DIGITS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    POSITION_ANCHORS,
    POSITIONS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    TEXTURES,
)

_QUADRANT_ORIGINS = np.array([(0, 0), (16, 0), (0, 16), (16, 16)], dtype=np.float32)
_ALL_KINDS = tuple(range(len(SHAPES) + 1))


def rng_for(*key: object) -> np.random.Generator:
    """Make a numpy generator seeded from a stable hash of ``key`` (not the salted ``hash``).

    Args:
        key: Values whose ``str`` identifies the stream, e.g. ``("task", "shape", "train", 0)``.
    """
    digest = hashlib.sha256("\x1f".join(map(str, key)).encode("utf-8")).digest()
    words = np.frombuffer(digest, dtype="<u4").tolist()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


@dataclass(frozen=True)
class Shift:
    """Departures from the corpus's look that give a downstream task a domain gap.

    The pre-training corpus never shows them, so a zero-shot model meets them unprepared while
    fine-tuning on the task's own images learns them; the label stays unambiguous.

    Attributes:
        color_cast: Largest deviation of the per-channel gains of a global colour cast
            (lighting); 0 means none.
        texture_scale: Pixels added to the period of stripes, checks and dots.
        texture_contrast: Factor on the brightness gap between the two background tones.
    """

    color_cast: float = 0.0
    texture_scale: int = 0
    texture_contrast: float = 1.0


@dataclass(frozen=True)
class Scenes:
    """A batch of ``n`` scenes.

    Factor arrays (int64, shape ``[n]``) index into the tuples of
    :mod:`tvtool.synthetic_world.vocab`.

    Attributes:
        kind: Object kind: an index into ``SHAPES``, or ``DIGIT_KIND`` for a digit glyph.
        digit: Digit shown when ``kind == DIGIT_KIND`` (0 otherwise).
        color: Object colour.
        size: Object size.
        count: Number of objects, 1 to ``MAX_OBJECTS``.
        position: Position of a single object; -1 when ``count > 1``.
        texture: Background texture.
        centers: Object centres ``(x, y)`` in pixels, ``[n, MAX_OBJECTS, 2]`` (NaN if unused).
        radius: Object half-extent in pixels, ``[n]``.
        rgb: Object colour after jitter, ``[n, 3]`` float32 in 0..255.
        tones: The two background tones, ``[n, 2, 3]`` float32 in 0..255.
        pattern: Texture parameters ``[n, 4]`` (orientation, period, phase x, phase y).
        noise_seed: Seed of the per-pixel noise of ``noisy`` backgrounds, ``[n]`` uint32.
        cast: Per-channel gains of a global colour cast, ``[n, 3]`` float32 (ones: none).
    """

    kind: np.ndarray
    digit: np.ndarray
    color: np.ndarray
    size: np.ndarray
    count: np.ndarray
    position: np.ndarray
    texture: np.ndarray
    centers: np.ndarray
    radius: np.ndarray
    rgb: np.ndarray
    tones: np.ndarray
    pattern: np.ndarray
    noise_seed: np.ndarray
    cast: np.ndarray

    def __len__(self) -> int:
        return int(self.kind.shape[0])


def _choice(rng: np.random.Generator, n: int, values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)[rng.integers(0, len(values), size=n)]


def sample_scenes(
    rng: np.random.Generator,
    n: int,
    fixed: Mapping[str, np.ndarray | int] | None = None,
    kinds: Sequence[int] = _ALL_KINDS,
    single_prob: float | None = None,
    shift: Shift | None = None,
    choices: Mapping[str, Sequence[int]] | None = None,
) -> Scenes:
    """Sample ``n`` scenes; factors not in ``fixed`` are drawn uniformly.

    Digits are always drawn alone (``count == 1``) so that a caption names one digit.

    Args:
        rng: Source of randomness (the result is a pure function of its state).
        n: Number of scenes.
        fixed: Factor values to use instead of sampling (an int for all scenes or an array
            of ``n`` values). Keys: ``kind``, ``digit``, ``color``, ``size``, ``count``,
            ``position``, ``texture``.
        kinds: Object kinds to draw from when ``kind`` is not fixed.
        single_prob: Probability of a single object when ``count`` is not fixed; ``None``
            draws the count uniformly.
        choices: Allowed values of factors that are drawn (e.g. ``{"size": (1, 2)}``).
        shift: Domain gap to apply (``None``: the corpus's look). Its random draws come after
            all others, so the same generator state gives the same scenes otherwise.

    Returns:
        The sampled scenes.
    """
    fixed = dict(fixed or {})
    allowed = dict(choices or {})

    def factor(name: str, values: Sequence[int]) -> np.ndarray:
        if name in fixed:
            return np.broadcast_to(np.asarray(fixed[name], dtype=np.int64), (n,)).copy()
        return _choice(rng, n, allowed.get(name, values))

    kind = factor("kind", kinds)
    digit = np.where(kind == DIGIT_KIND, factor("digit", range(len(DIGITS))), 0)
    color = factor("color", range(len(COLORS)))
    size = factor("size", range(len(SIZES)))
    if "count" in fixed:
        count = factor("count", ())
    elif single_prob is None:
        count = factor("count", range(1, MAX_OBJECTS + 1))
    else:
        many = _choice(rng, n, range(2, MAX_OBJECTS + 1))
        count = np.where(rng.random(n) < single_prob, 1, many)
    count = np.where(kind == DIGIT_KIND, 1, count)
    position = np.where(count == 1, factor("position", range(len(POSITIONS))), -1)
    texture = factor("texture", range(len(TEXTURES)))
    if np.any((count < 1) | (count > MAX_OBJECTS)):
        raise ValueError(f"count must be 1..{MAX_OBJECTS}")

    radius = SIZE_RADIUS[size] * rng.uniform(0.93, 1.07, size=n).astype(np.float32)
    radius = np.where(kind == DIGIT_KIND, radius + DIGIT_EXTRA_RADIUS, radius).astype(np.float32)
    centers = _place(rng, count, position, radius)
    jitter = rng.uniform(-18, 18, size=(n, 3)).astype(np.float32)
    rgb = np.clip(COLOR_RGB[color] + jitter, 0, 255)
    base = rng.uniform(25, 95, size=(n, 1)) + rng.uniform(-15, 15, size=(n, 3))
    lift = rng.uniform(45, 80, size=(n, 1)) + rng.uniform(-10, 10, size=(n, 3))
    tones = np.stack([base, base + lift], axis=1).clip(0, 255).astype(np.float32)
    pattern = np.stack([
        rng.integers(0, 2, size=n),          # orientation (stripes) / direction sign
        rng.integers(2, 4, size=n),          # period
        rng.integers(0, 8, size=n),          # phase x
        rng.integers(0, 8, size=n),          # phase y
    ], axis=1).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
    # Gradients need a direction, not a period: reuse the phase slot as an angle.
    pattern[:, 2] = np.where(texture == TEXTURES.index("gradient"), angle, pattern[:, 2])
    noise_seed = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    cast = np.ones((n, 3), dtype=np.float32)
    if shift is not None:
        cast = rng.uniform(1 - shift.color_cast, 1 + shift.color_cast,
                           size=(n, 3)).astype(np.float32)
        pattern[:, 1] += shift.texture_scale
        tones[:, 1] = tones[:, 0] + (tones[:, 1] - tones[:, 0]) * shift.texture_contrast
    return Scenes(kind, digit, color, size, count, position, texture, centers, radius, rgb,
                  tones, pattern, noise_seed, cast)


def _place(rng: np.random.Generator, count: np.ndarray, position: np.ndarray,
           radius: np.ndarray) -> np.ndarray:
    """Object centres: single objects near their position's anchor, groups one per quadrant.

    One object per quadrant keeps groups from overlapping, so counting stays well defined.
    """
    n = count.shape[0]
    lo = radius + 0.5
    hi = IMAGE_SIZE - 0.5 - radius
    anchor = POSITION_ANCHORS[np.maximum(position, 0)]
    single = np.clip(anchor + rng.uniform(-2.5, 2.5, size=(n, 2)), lo[:, None], hi[:, None])

    quadrants = np.argsort(rng.random((n, MAX_OBJECTS)), axis=1)
    q_lo = radius + 1.0
    q_hi = np.maximum(15.0 - radius, q_lo)
    offset = q_lo[:, None, None] + rng.random((n, MAX_OBJECTS, 2)) * (q_hi - q_lo)[:, None, None]
    q_hi_eq = q_hi == q_lo
    offset[q_hi_eq] = 8.0  # too large to jitter: centre it in its quadrant
    group = _QUADRANT_ORIGINS[quadrants] + offset

    centers = np.where((count == 1)[:, None, None], single[:, None, :], group)
    unused = np.arange(MAX_OBJECTS)[None, :] >= count[:, None]
    centers = centers.astype(np.float32)
    centers[unused] = np.nan
    return centers
