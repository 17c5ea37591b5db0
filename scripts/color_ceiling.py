"""How much of the ``color`` task's label can any model read from its images?

The ``studio`` domain lights one object with a strong colour gel (per-channel gains in
0.5..1.5). Whether the object's colour can still be named depends on what else the image
shows of the gel. This script estimates the best accuracy any classifier can reach, from the
scene parameters the renderer turns into pixels: the object's colour under the gel and the
backdrop's two tones under the same gel (``--object-only``: the object's colour alone).

The estimate is the accuracy of a k-nearest-neighbour vote (standardised features) on fresh
test scenes, trained on many scenes; k-NN approaches the Bayes accuracy from below as the
training set grows, so the figure is a slight underestimate of the ceiling. Run it on two
generator versions to compare them (docs/embedded-world.md).

Usage::

    python scripts/color_ceiling.py [--object-only] [--train 40000] [--test 4000] [--seed 0]

Prints one JSON document to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from tvtool.synthetic_world import GENERATOR_VERSION, TASKS, sample_domain


def features(n: int, rng: np.random.Generator, object_only: bool) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """Scene parameters as the camera sees them: ``[n, 9]`` (or ``[n, 3]``) and labels."""
    labels = rng.integers(0, len(TASKS["color"].classnames), size=n)
    scenes = sample_domain("studio", rng, labels, shifted=True)
    seen_object = np.clip(scenes.rgb * scenes.cast, 0, 255)
    if object_only:
        return seen_object.astype(np.float32), labels
    seen_backdrop = np.clip(scenes.tones * scenes.cast[:, None, :], 0, 255).reshape(n, 6)
    return np.concatenate([seen_object, seen_backdrop], axis=1).astype(np.float32), labels


def knn_accuracy(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 k: int, chunk: int = 500) -> float:
    """Accuracy of a majority vote of the ``k`` nearest training scenes."""
    mean, std = train[0].mean(axis=0), train[0].std(axis=0)
    reference = torch.from_numpy((train[0] - mean) / std)
    reference_labels = torch.from_numpy(train[1])
    queries = torch.from_numpy((test[0] - mean) / std)
    correct = 0
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start:start + chunk], reference)
        nearest = distances.topk(k, largest=False).indices
        votes = torch.mode(reference_labels[nearest], dim=1).values.numpy()
        correct += int((votes == test[1][start:start + chunk]).sum())
    return correct / len(test[1])


def main() -> int:
    """Estimate the ceiling and print it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--object-only", action="store_true",
                        help="use the object's colour alone, not the backdrop")
    parser.add_argument("--train", type=int, default=40000)
    parser.add_argument("--test", type=int, default=4000)
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    train = features(args.train, rng, args.object_only)
    test = features(args.test, rng, args.object_only)
    accuracy = knn_accuracy(train, test, args.k)
    print(json.dumps({
        "generator_version": GENERATOR_VERSION,
        "features": "object" if args.object_only else "object+backdrop",
        "train": args.train, "test": args.test, "k": args.k, "seed": args.seed,
        "ceiling": round(accuracy, 4),
        "standard_error": round(math.sqrt(accuracy * (1 - accuracy) / args.test), 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
