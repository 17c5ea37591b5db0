"""The embedded synthetic world: generator, captioned corpus, tasks, tiny CLIP pre-training.

A procedural image generator, its captioned pre-training corpus, its downstream tasks, and
the pre-training of the embedded ``tvtool-tiny`` CLIP.

Public API:

* :data:`TASKS`, :class:`SyntheticTask`, :func:`generate_task` -- downstream tasks.
* :data:`DOMAINS`, :func:`sample_domain`, :func:`domain_captions` -- the image domains.
* :func:`corpus_batch` -- the captioned pre-training corpus (every domain, mixed).
* :func:`sample_scenes`, :func:`render`, :class:`Scenes`, :func:`rng_for` -- the generator.
* :class:`PretrainConfig`, :class:`PretrainCheckpoints`, :func:`pretrain_tiny`,
  :func:`write_pretrained` -- pre-training, resumable
  (import from :mod:`tvtool.synthetic_world.pretrain`; it pulls in the model code).
"""

from tvtool.synthetic_world.domains import DOMAINS, LANDS, Domain, domain_captions, sample_domain
from tvtool.synthetic_world.render import render
from tvtool.synthetic_world.scenes import Scenes, rng_for, sample_scenes
from tvtool.synthetic_world.tasks import (
    GENERATOR_VERSION,
    POOL_SIZES,
    TASKS,
    SyntheticTask,
    corpus_batch,
    generate_task,
)

__all__ = [
    "DOMAINS",
    "GENERATOR_VERSION",
    "LANDS",
    "POOL_SIZES",
    "TASKS",
    "Domain",
    "Scenes",
    "SyntheticTask",
    "corpus_batch",
    "domain_captions",
    "generate_task",
    "render",
    "rng_for",
    "sample_domain",
    "sample_scenes",
]
