"""The embedded synthetic world: generator, captioned corpus, tasks, tiny CLIP pre-training.

A procedural image generator, its captioned pre-training corpus, its downstream tasks, and
the pre-training of the embedded ``tvtool-tiny`` CLIP.

Public API:

* :data:`TASKS`, :class:`SyntheticTask`, :func:`generate_task` -- downstream tasks.
* :func:`corpus_batch`, :class:`CaptionStyle` -- the captioned pre-training corpus.
* :func:`sample_scenes`, :func:`render`, :class:`Scenes`, :func:`rng_for` -- the generator.
* :class:`PretrainConfig`, :func:`pretrain_tiny`, :func:`write_pretrained` -- pre-training
  (import from :mod:`tvtool.world.pretrain`; it pulls in the model code).
"""

from tvtool.world.captions import CaptionStyle, captions
from tvtool.world.render import render
from tvtool.world.scenes import Scenes, rng_for, sample_scenes
from tvtool.world.tasks import (
    GENERATOR_VERSION,
    POOL_SIZES,
    TASKS,
    SyntheticTask,
    corpus_batch,
    generate_task,
)

__all__ = [
    "GENERATOR_VERSION",
    "POOL_SIZES",
    "TASKS",
    "CaptionStyle",
    "Scenes",
    "SyntheticTask",
    "captions",
    "corpus_batch",
    "generate_task",
    "render",
    "rng_for",
    "sample_scenes",
]
