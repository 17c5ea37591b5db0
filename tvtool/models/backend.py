"""open_clip, with tvtool's model configs registered: the one module that imports open_clip.

open_clip (and torchvision with it) takes seconds to import, so nothing of :mod:`tvtool.models`
imports it at package import time: the modules that build or describe models import it from
here, and the light ones (:mod:`tvtool.models.refs`, :mod:`tvtool.models.sources`) only inside
the functions that need it. Importing this module registers ``tvtool/models/configs/``
(``tvtool-tiny``, ``tvtool-small``, ``tvtool-base``) with open_clip, so
``from tvtool.models.backend import open_clip`` gives an open_clip that builds them.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

CONFIG_DIR = Path(__file__).parent / "configs"
"""tvtool's open_clip configs (``tvtool-tiny``, ``tvtool-small``, ``tvtool-base``)."""

open_clip.add_model_config(CONFIG_DIR)

__all__ = ["CONFIG_DIR", "open_clip"]
