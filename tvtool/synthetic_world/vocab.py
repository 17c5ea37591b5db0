"""The factors of the synthetic world and the words that name them.

Every scene is a few identical objects on a textured background. The factors below are the
only things that vary on purpose; the renderer adds nuisance (jitter of colour, size,
position and background tones) so that no factor is a single pixel value.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32
"""Side of every rendered image, in pixels (the tvtool-tiny input size)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")
"""Geometric object kinds; kind index ``len(SHAPES)`` is a digit glyph."""

DIGIT_KIND = len(SHAPES)
"""The object kind of a digit glyph."""

DIGITS: tuple[str, ...] = tuple("0123456789")

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
COLOR_RGB = np.array(
    [(220, 40, 40), (245, 140, 20), (235, 225, 40), (40, 190, 60), (45, 90, 240),
     (150, 60, 210), (250, 135, 200), (240, 240, 240)],
    dtype=np.float32,
)

SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_RADIUS = np.array([4.0, 5.5, 7.0], dtype=np.float32)
"""Half-extent of an object of each size, in pixels."""

DIGIT_EXTRA_RADIUS = 2.5
"""Digits are drawn this much larger (half-height, pixels) so that strokes stay legible."""

COUNTS: tuple[str, ...] = ("one", "two", "three", "four")
MAX_OBJECTS = len(COUNTS)

POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
POSITION_ANCHORS = np.array([(9, 9), (23, 9), (9, 23), (23, 23), (16, 16)], dtype=np.float32)
"""Centre (x, y) of a single object at each position, before jitter."""

TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "noisy", "gradient")

FACTORS: tuple[str, ...] = ("kind", "digit", "color", "size", "count", "position", "texture")
"""Names of the per-scene factor arrays of :class:`tvtool.synthetic_world.scenes.Scenes`."""

_FONT_ROWS = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
FONT = np.array([[[c == "#" for c in row] for row in _FONT_ROWS[d]] for d in DIGITS], dtype=bool)
"""A 5x7 bitmap font, ``FONT[digit, row, column]``."""
FONT_ROWS, FONT_COLS = FONT.shape[1:]


def plural(noun: str) -> str:
    """English plural of one of the world's nouns."""
    return noun + ("es" if noun.endswith(("s", "x")) else "s")
