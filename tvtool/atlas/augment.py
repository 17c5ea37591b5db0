"""Random image augmentation of preprocessed batches (aTLAS' and open_clip's crops)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Area range of the random resized crop: aTLAS' few-shot / UFM transform and open_clip's
# training transform; both use aspect ratios 3/4..4/3 and bicubic resampling.
_CROP_SCALE = {"reference": (0.5, 1.0), "train": (0.9, 1.0)}
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def crop_box(height: int, width: int, scale: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop (area fraction in ``scale``).

    Up to ten draws of an area fraction and a log-uniform aspect ratio in 3/4..4/3; when no
    draw fits, the largest centred crop of the nearest allowed aspect ratio.
    """
    area = height * width
    low, high = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(low + (high - low) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    aspect = min(max(width / height, _RATIO[0]), _RATIO[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else \
        (round(height * aspect), height)
    return (height - h) // 2, (width - w) // 2, h, w


def augment(images: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """Randomly augmented copies of a ``[n, C, H, W]`` batch of preprocessed images.

    ``train``: a random resized crop of 90-100 % of the area (open_clip's training transform);
    ``reference``: a crop of 50-100 % and a horizontal flip with probability 1/2 (aTLAS'
    ``learn_few_shots.py`` and ``learn_ufm.py``); ``none``: the batch itself. Crops are
    resampled bicubically to the input size. They act on the normalised tensors, which equals
    cropping before the normalisation (a per-channel affine map commutes with resampling)
    except that PIL clamps bicubic overshoot to the pixel range.
    """
    if kind == "none":
        return images
    height, width = int(images.shape[-2]), int(images.shape[-1])
    out = []
    for image in images:
        top, left, h, w = crop_box(height, width, _CROP_SCALE[kind], generator)
        crop = image[None, :, top:top + h, left:left + w].float()
        resized = F.interpolate(crop, size=(height, width), mode="bicubic",
                                align_corners=False)[0].to(images.dtype)
        if kind == "reference" and bool(torch.rand(1, generator=generator) < 0.5):
            resized = resized.flip(-1)
        out.append(resized)
    return torch.stack(out)
