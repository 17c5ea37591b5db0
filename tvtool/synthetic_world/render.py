"""Vectorised rendering of :class:`~tvtool.synthetic_world.scenes.Scenes` to 32x32 RGB images."""

from __future__ import annotations

import numpy as np

from tvtool.synthetic_world.scenes import Scenes
from tvtool.synthetic_world.vocab import (
    DIGIT_KIND,
    FONT,
    FONT_COLS,
    FONT_ROWS,
    IMAGE_SIZE,
    SHAPES,
    TEXTURES,
)

_SUPERSAMPLE = 2
"""Objects are drawn on a grid this many times finer and averaged down (anti-aliasing)."""

_CHUNK = 256
"""Scenes per vectorised step; bounds the ``[chunk, objects, 64, 64]`` temporaries (~17 MB)."""


def render(scenes: Scenes) -> np.ndarray:
    """Draw scenes as images.

    The result depends only on ``scenes`` (noise comes from each scene's ``noise_seed``), so
    the same scenes always give the same bytes.

    Args:
        scenes: The scenes to draw.

    Returns:
        ``uint8`` array ``[n, 32, 32, 3]``.
    """
    n = len(scenes)
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        background = _backgrounds(scenes, sl)
        alpha = _coverage(scenes, sl)[..., None]
        rgb = scenes.rgb[sl][:, None, None, :]
        image = background * (1.0 - alpha) + rgb * alpha
        image = image * scenes.cast[sl][:, None, None, :]
        out[sl] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out


def _backgrounds(scenes: Scenes, sl: slice) -> np.ndarray:
    texture = scenes.texture[sl]
    pattern = scenes.pattern[sl]
    tones = scenes.tones[sl]
    m = texture.shape[0]
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    mix = np.zeros((m, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    orient, period, phase_x, phase_y = (pattern[:, i][:, None, None] for i in range(4))

    def where(name: str) -> np.ndarray:
        return np.flatnonzero(texture == TEXTURES.index(name))

    idx = where("plain")
    # A flat tone somewhere between the two, so brightness alone does not give "plain" away.
    mix[idx] = (scenes.noise_seed[sl][idx] % 1000 / 1000.0)[:, None, None]
    idx = where("striped")
    coord = np.where(orient[idx] > 0, x, y)
    mix[idx] = np.floor((coord + phase_x[idx]) / period[idx]) % 2
    idx = where("checkered")
    cell = period[idx] + 1
    mix[idx] = (np.floor((x + phase_x[idx]) / cell) + np.floor((y + phase_y[idx]) / cell)) % 2
    idx = where("dotted")
    spacing = period[idx] + 3
    mix[idx] = (((x + phase_x[idx]) % spacing) < 2) & (((y + phase_y[idx]) % spacing) < 2)
    idx = where("noisy")
    for row, seed in zip(idx, scenes.noise_seed[sl][idx], strict=True):
        mix[row] = np.random.default_rng(int(seed)).random((IMAGE_SIZE, IMAGE_SIZE))
    idx = where("gradient")
    angle = phase_x[idx]
    proj = (x - IMAGE_SIZE / 2) * np.cos(angle) + (y - IMAGE_SIZE / 2) * np.sin(angle)
    mix[idx] = np.clip(proj / IMAGE_SIZE + 0.5, 0, 1)

    lo, hi = tones[:, 0][:, None, None, :], tones[:, 1][:, None, None, :]
    return lo + (hi - lo) * mix[..., None]


def _coverage(scenes: Scenes, sl: slice) -> np.ndarray:
    """Fraction of each pixel covered by an object, ``[m, 32, 32]`` in 0..1."""
    fine = IMAGE_SIZE * _SUPERSAMPLE
    grid = (np.arange(fine, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    centers = scenes.centers[sl]
    kind = scenes.kind[sl]
    m = centers.shape[0]
    covered = np.zeros((m, fine, fine), dtype=bool)
    for k in np.unique(kind):
        idx = np.flatnonzero(kind == k)
        dx = grid[None, None, None, :] - centers[idx, :, 0][:, :, None, None]
        dy = grid[None, None, :, None] - centers[idx, :, 1][:, :, None, None]
        r = scenes.radius[sl][idx][:, None, None, None]
        if k == DIGIT_KIND:
            mask = _glyph(dx, dy, r, scenes.digit[sl][idx])
        else:
            mask = _shape(SHAPES[k], dx, dy, r)
        # Unused object slots have NaN centres, and every comparison with NaN is False.
        covered[idx] = mask.any(axis=1)
    blocks = covered.reshape(m, IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def _shape(name: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if name == "circle":
        return dx * dx + dy * dy <= r * r
    if name == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if name == "triangle":
        return (dy >= -r) & (dy <= 0.8 * r) & (ax <= (dy + r) / 1.8)
    if name == "cross":
        bar = 0.34 * r
        return ((ax <= bar) & (ay <= r)) | ((ay <= bar) & (ax <= r))
    if name == "diamond":
        return ax + ay <= 1.1 * r
    if name == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {name!r}")


def _glyph(dx: np.ndarray, dy: np.ndarray, r: np.ndarray, digit: np.ndarray) -> np.ndarray:
    """Cover a digit of the 5x7 font, ``2r`` tall, by nearest-neighbour lookup."""
    cell = 2.0 * r / FONT_ROWS
    with np.errstate(invalid="ignore"):
        col = np.floor(dx / cell + FONT_COLS / 2)
        row = np.floor(dy / cell + FONT_ROWS / 2)
        inside = (col >= 0) & (col < FONT_COLS) & (row >= 0) & (row < FONT_ROWS)
    col = np.where(inside, col, 0).astype(np.int64)
    row = np.where(inside, row, 0).astype(np.int64)
    lit = FONT[digit[:, None, None, None], row, col]
    return inside & lit
