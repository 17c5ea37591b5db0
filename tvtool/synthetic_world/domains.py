"""Image domains of the synthetic world: each downstream task lives in a look of its own.

The eight tasks of the CLIP task-arithmetic benchmark are eight different image domains
(handwritten digits, satellite tiles, traffic signs, textures, scenes, cars, ...). A domain
here is a family of scenes with its own backgrounds, palette and objects: ``mnist`` draws one
light digit on black, ``aerial`` draws land-cover tiles without objects, ``tabletop`` draws
small objects on a grey table, and so on. The pre-training corpus mixes every domain with
partial, noisy captions (:func:`domain_captions`); each downstream task draws from one domain.

Everything is a pure function of the random generator's state, vectorised over scenes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tvtool.synthetic_world.scenes import Scenes, sample_scenes
from tvtool.synthetic_world.vocab import (
    COLOR_RGB,
    COLORS,
    COUNTS,
    DIGIT_KIND,
    DIGITS,
    MAX_OBJECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    plural,
)

LANDS: tuple[str, ...] = ("forest", "lake", "farmland", "town", "desert", "meadow")
"""Land-cover classes of the ``aerial`` domain."""

_LAND_TEXTURE = np.array([TEXTURES.index(t) for t in
                          ("noisy", "gradient", "striped", "checkered", "dotted", "plain")])
_LAND_TONES = np.array([
    [(20, 60, 25), (45, 105, 40)],      # forest: dark greens, noisy canopy
    [(20, 45, 110), (50, 100, 170)],    # lake: blues, smooth depth gradient
    [(160, 150, 70), (90, 140, 50)],    # farmland: strips of crops
    [(110, 110, 115), (175, 120, 95)],  # town: grey roads and red roofs in blocks
    [(195, 165, 115), (215, 190, 145)],  # desert: sand with faint dunes
    [(105, 165, 75), (125, 185, 90)],   # meadow: flat light green
], dtype=np.float32)

_CIRCLE, _RING = SHAPES.index("circle"), SHAPES.index("ring")
_SHAPE_KINDS = tuple(range(len(SHAPES)))


@dataclass(frozen=True)
class Domain:
    """One image domain.

    Attributes:
        name: Domain name.
        factor: The factor its captions name first (and its task's label).
        classnames: Names of that factor's values, in label order.
        caption_nouns: Phrases that open a caption (``"a drawing of"``, ...).
        p_named: Probability that a corpus caption names the factor.
    """

    name: str
    factor: str
    classnames: tuple[str, ...]
    caption_nouns: tuple[str, ...]
    p_named: float = 0.7


DOMAINS: Mapping[str, Domain] = {d.name: d for d in (
    Domain("mnist", "digit", DIGITS, ("a photo of", "a handwritten", "a scan of")),
    Domain("sketch", "kind", SHAPES, ("a drawing of", "a sketch of", "a doodle of")),
    Domain("studio", "color", COLORS, ("a studio photo of", "a photo of", "a product shot of")),
    Domain("micro", "size", SIZES, ("a microscope image of", "a slide with", "a micrograph of")),
    Domain("tabletop", "count", COUNTS, ("a photo of", "a table with", "a picture of")),
    Domain("radar", "position", POSITIONS, ("a radar screen with", "a radar image of",
                                            "a screen with")),
    Domain("texture", "texture", TEXTURES, ("a close-up of", "a photo of", "a swatch of")),
    Domain("aerial", "land", LANDS, ("a satellite photo of", "an aerial view of",
                                     "a satellite image of")),
)}


def sample_domain(domain: str, rng: np.random.Generator, labels: np.ndarray,
                  shifted: bool = False) -> Scenes:
    """Sample scenes of one domain whose labelled factor takes the values ``labels``.

    Args:
        domain: A key of :data:`DOMAINS`.
        rng: Source of randomness.
        labels: ``[n]`` int64 label of each scene (an index into the domain's classnames).
        shifted: Draw the downstream task's version of the domain, which differs from the
            pre-training corpus's as a benchmark's images differ from web images of the same
            subject (another camera, stain, season or lighting; docs/embedded-world.md). Without
            it zero-shot transfer would leave next to nothing for fine-tuning to learn.

    Returns:
        Scenes ready for :func:`tvtool.synthetic_world.render.render`.
    """
    n = labels.shape[0]
    plain = TEXTURES.index("plain")
    noisy = TEXTURES.index("noisy")
    if domain == "mnist":
        scenes = sample_scenes(rng, n, fixed={"kind": DIGIT_KIND, "digit": labels,
                                              "texture": plain, "size": 2,
                                              "position": POSITIONS.index("center")})
        level = rng.uniform(0, 30, size=(n, 1)).astype(np.float32)
        ink: np.ndarray = rng.uniform(190, 255, size=(n, 1)).astype(np.float32)
        tones = np.repeat(np.repeat(level, 3, 1)[:, None], 2, 1)
        if shifted:  # a worn scan: smaller, dimmer strokes on a grainy page
            scenes = _replace(scenes, radius=scenes.radius * 0.9)
            ink = ink * rng.uniform(0.6, 0.85, size=(n, 1))
            tones[:, 1] += rng.uniform(10, 30, size=(n, 1))
            scenes = _replace(scenes, texture=np.full(n, noisy))
        return _replace(scenes, tones=tones, rgb=np.repeat(ink, 3, 1))
    if domain == "sketch":
        scenes = sample_scenes(rng, n, fixed={"kind": labels}, choices={"size": (1, 2)},
                               single_prob=0.6)
        paper = rng.uniform(185, 235, size=(n, 1)) + rng.uniform(-8, 8, size=(n, 3))
        grain = paper + rng.uniform(-12, 12, size=(n, 1))
        ink = COLOR_RGB[scenes.color] * rng.uniform(0.15, 0.5, size=(n, 1))
        texture = np.where(rng.random(n) < 0.5, plain, noisy)
        return _replace(scenes, tones=_pair(paper, grain), rgb=ink, texture=texture)
    if domain == "studio":
        scenes = sample_scenes(rng, n, fixed={"color": labels, "count": 1, "size": 2,
                                              "texture": TEXTURES.index("gradient")},
                               kinds=_SHAPE_KINDS)
        if shifted:
            # Strong colour gels light a grey backdrop as well as the object, so the image
            # carries its own white reference (a photographer's grey card) and the colour
            # stays recoverable. Generator 3 lit a coloured backdrop: the object's colour
            # alone then named the label for only about 88 % of images, a ceiling every
            # fine-tune hit (docs/embedded-world.md, scripts/color_ceiling.py).
            backdrop = rng.uniform(20, 110, size=(n, 1)) + rng.uniform(-5, 5, size=(n, 3))
        else:
            backdrop = rng.uniform(20, 110, size=(n, 3))
        lift = backdrop + rng.uniform(20, 60, size=(n, 1))
        spread = 0.5 if shifted else 0.2  # stage lighting with strong colour gels
        cast = rng.uniform(1 - spread, 1 + spread, size=(n, 3)).astype(np.float32)
        return _replace(scenes, tones=_pair(backdrop, lift), cast=cast)
    if domain == "micro":
        kind = np.where(rng.random(n) < 0.5, _CIRCLE, _RING)
        scenes = sample_scenes(rng, n, fixed={"size": labels, "kind": kind,
                                              "texture": noisy})
        stain = np.stack([rng.uniform(130, 200, n), rng.uniform(40, 100, n),
                          rng.uniform(130, 210, n)], axis=1)
        tissue = np.array([225, 195, 215]) + rng.uniform(-15, 15, size=(n, 3))
        if shifted:  # another stain: blue-violet cells on a grey-blue slide
            stain = stain[:, [1, 1, 2]] * np.array([0.8, 1.0, 1.0])
            tissue = tissue[:, [1, 1, 0]] + np.array([0, 5, 15])
        return _replace(scenes, tones=_pair(tissue, tissue - rng.uniform(8, 20, (n, 1))),
                        rgb=stain)
    if domain == "tabletop":
        scenes = sample_scenes(rng, n, fixed={"count": labels + 1, "size": 0,
                                              "texture": noisy}, kinds=_SHAPE_KINDS)
        table = rng.uniform(90, 130, size=(n, 1)) + rng.uniform(-5, 5, size=(n, 3))
        if shifted:  # a wooden table under warm light
            table = table * np.array([1.1, 0.8, 0.5])
        return _replace(scenes, tones=_pair(table, table + rng.uniform(15, 30, (n, 1))))
    if domain == "radar":
        scenes = sample_scenes(rng, n, fixed={"position": labels, "count": 1, "size": 0,
                                              "texture": TEXTURES.index("checkered"),
                                              "kind": _CIRCLE})
        screen = np.stack([rng.uniform(0, 20, n), rng.uniform(30, 60, n),
                           rng.uniform(0, 25, n)], axis=1)
        grid = screen + np.array([0, 1, 0]) * rng.uniform(10, 25, size=(n, 1))
        blip = np.stack([rng.uniform(90, 190, n), rng.uniform(220, 255, n),
                         rng.uniform(90, 190, n)], axis=1)
        pattern = scenes.pattern.copy()
        pattern[:, 1] += 3  # a coarse grid
        if shifted:  # an amber screen
            screen, grid, blip = screen[:, [1, 1, 0]], grid[:, [1, 1, 0]], blip[:, [1, 0, 2]]
            blip[:, 2] *= 0.3
        return _replace(scenes, tones=_pair(screen, grid), rgb=blip, pattern=pattern)
    if domain == "texture":
        scenes = sample_scenes(rng, n, fixed={"texture": labels})
        first = rng.uniform(0, 255, size=(n, 3))
        second = np.clip(first + rng.choice([-1, 1], size=(n, 1)) * rng.uniform(60, 140, (n, 3)),
                         0, 255)
        pattern = scenes.pattern.copy()
        pattern[:, 1] += rng.integers(0, 3, size=n)
        if shifted:  # coarser weaves photographed with less contrast
            pattern[:, 1] += 2
            second = first + (second - first) * 0.5
        return _replace(scenes, tones=_pair(first, second), pattern=pattern,
                        centers=np.full_like(scenes.centers, np.nan))
    if domain == "aerial":
        scenes = sample_scenes(rng, n, fixed={"texture": _LAND_TEXTURE[labels]})
        tones = _LAND_TONES[labels] + rng.uniform(-18, 18, size=(n, 1, 3))
        tones = tones + rng.uniform(-10, 10, size=(n, 1, 1))
        if shifted:  # a false-colour (near-infrared) composite: vegetation shows red
            tones = tones[:, :, [1, 0, 2]]
        return _replace(scenes, tones=tones, centers=np.full_like(scenes.centers, np.nan))
    raise KeyError(domain)


def domain_captions(domain: str, scenes: Scenes, labels: np.ndarray, rng: np.random.Generator,
                    noise: float = 0.15) -> list[str]:
    """Corpus captions of scenes of one domain: partial, sometimes wrong, like alt-text.

    A caption opens with one of the domain's phrases and names the domain's factor with
    probability ``p_named``; a named value is replaced by a wrong one with probability
    ``noise``. Object domains sometimes add a second factor (colour or count).

    Args:
        domain: A key of :data:`DOMAINS`.
        scenes: The scenes (from :func:`sample_domain`).
        labels: Their labels.
        rng: Decides what is named and what is mislabelled.
        noise: Probability of naming a wrong value.

    Returns:
        One lowercase caption per scene, at most 12 words.
    """
    spec = DOMAINS[domain]
    n = labels.shape[0]
    k = len(spec.classnames)
    named: np.ndarray = np.asarray(rng.random(n) < spec.p_named)
    wrong: np.ndarray = np.asarray(rng.random(n) < noise)
    offset = np.asarray(rng.random(n) * (k - 1)).astype(np.int64)
    shifted = (labels + 1 + offset) % k
    value: np.ndarray = np.where(wrong, shifted, labels)
    opener: np.ndarray = np.asarray(rng.integers(0, len(spec.caption_nouns), size=n))
    extra: np.ndarray = np.asarray(rng.random(n) < 0.3)
    out = []
    for i in range(n):
        head = spec.caption_nouns[opener[i]]
        word = spec.classnames[value[i]]
        color = COLORS[int(scenes.color[i])]
        if domain == "mnist":
            body = f"the digit {word}" if named[i] else "a digit"
            if head == "a handwritten":
                body = f"digit {word}" if named[i] else "digit"
        elif domain == "sketch":
            count = int(scenes.count[i])
            noun = word if named[i] else "shape"
            body = f"a {noun}" if count == 1 else f"{COUNTS[count - 1]} {plural(noun)}"
        elif domain == "studio":
            noun = SHAPES[int(scenes.kind[i])] if extra[i] else "object"
            body = f"a {word} {noun}" if named[i] else f"a {noun}"
        elif domain == "micro":
            body = f"{word} cells" if named[i] else "some cells"
        elif domain == "tabletop":
            noun = plural(SHAPES[int(scenes.kind[i])]) if extra[i] else "objects"
            if named[i]:
                body = f"{word} {noun if word != 'one' else noun[:-1]}"
                if word == "one":
                    body = f"one {SHAPES[int(scenes.kind[i])] if extra[i] else 'object'}"
            else:
                body = f"some {noun}"
            body += " on a table"
        elif domain == "radar":
            body = f"a blip in the {word}" if named[i] else "a blip"
        elif domain == "texture":
            body = f"a {word} texture" if named[i] else "a texture"
        else:  # aerial
            body = f"a {word}" if named[i] else "land"
        if domain == "sketch" and extra[i]:
            body = f"{body} in {color}"
        out.append(f"{head} {body}")
    return out


def _pair(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.clip(np.stack([first, second], axis=1), 0, 255).astype(np.float32)


def _replace(scenes: Scenes, **changes: np.ndarray) -> Scenes:
    cast: dict[str, np.ndarray] = {name: np.asarray(value, dtype=np.float32) if name in
            ("tones", "rgb", "cast", "pattern", "centers", "radius") else
            np.asarray(value, dtype=np.int64) for name, value in changes.items()}
    if "rgb" in cast:
        cast["rgb"] = np.clip(cast["rgb"], 0, 255)
    return dataclasses.replace(scenes, **cast)


assert len(COUNTS) == MAX_OBJECTS
