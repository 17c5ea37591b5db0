"""Hugging Face model directories: reading a ``transformers`` export, writing open_clip's."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvtool.errors import InvalidInputError, UsageError
from tvtool.io.atomic import STDIO, current_umask, os_error
from tvtool.io.documents import read_json, write_bytes, write_json
from tvtool.io.safetensors_io import TensorInfo, write_tensors

# The single-file weight names ``save_pretrained`` writes, preferred first.
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_CONFIG = "config.json"


@dataclass(frozen=True)
class HfModelFiles:
    """Where the weights of a (possibly) Hugging Face checkpoint are, and its config.

    Attributes:
        weights: The weights file to read.
        config_path: The ``config.json`` beside the weights (None when absent).
    """

    weights: str
    config_path: str | None = None

    def read_config(self) -> dict[str, Any] | None:
        """The parsed ``config.json``, or None when there is none.

        Raises:
            InvalidInputError: not valid JSON, or not a JSON object.
        """
        if self.config_path is None:
            return None
        config = read_json(self.config_path)
        if not isinstance(config, dict):
            raise InvalidInputError(f"{self.config_path!r} is not a JSON object")
        return config


def hf_model_files(path: str) -> HfModelFiles:
    """Resolve a checkpoint argument that may be a Hugging Face model directory.

    A directory must hold ``model.safetensors`` or ``pytorch_model.bin`` (sharded exports are
    refused: merge the shards first); a file is taken as it is. In both cases a
    ``config.json`` in the same directory is noted (read later, only for Hugging Face weights),
    since it names the activation function the weights were trained with.

    Raises:
        InvalidInputError: a directory without single-file weights.
    """
    if path == STDIO:
        return HfModelFiles(path)
    given = Path(path).expanduser()
    if given.is_dir():
        weights = next((given / name for name in _HF_WEIGHTS if (given / name).is_file()), None)
        if weights is None:
            shards = [name for name in _HF_SHARD_INDEXES if (given / name).is_file()]
            if shards:
                raise InvalidInputError(
                    f"{path!r} holds a sharded checkpoint ({shards[0]}); tvtool reads "
                    "single-file exports", hint="save it again with a larger max_shard_size")
            raise InvalidInputError(f"directory {path!r} holds neither "
                                    f"{' nor '.join(_HF_WEIGHTS)}")
        folder = given
    else:
        weights = given
        folder = given.parent
    config_file = folder / _HF_CONFIG
    if not config_file.is_file() or config_file == weights:
        return HfModelFiles(str(weights))
    return HfModelFiles(str(weights), str(config_file))


OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
"""Weights file name of an open_clip Hugging Face directory (open_clip's ``save_for_hf``)."""
OPEN_CLIP_CONFIG = "open_clip_config.json"
"""Its config: ``{"model_cfg": ..., "preprocess_cfg": ...}``."""
MODEL_CARD = "README.md"


def check_new_directory(directory: str) -> Path:
    """Refuse an output directory that cannot be created, before any work is done.

    Raises:
        UsageError: the path is empty, or ``-`` (stdout cannot hold a directory).
        InvalidInputError: the path is a symbolic link (dangling or not: the directory is
            renamed into place, which would replace the link, not fill its target), a file,
            a non-empty directory, or its parent is missing.
    """
    if directory == STDIO:
        raise UsageError("'-' means stdout, which cannot hold a directory",
                         hint="give the path of a new directory")
    if not directory:
        raise UsageError("empty output directory path", hint="give the path of a new directory")
    target = Path(directory).expanduser()
    if target.is_symlink():
        raise InvalidInputError(f"{directory!r} is a symbolic link",
                                hint="give the real path of a new (or empty) directory")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidInputError(f"{directory!r} exists and is not an empty directory",
                                hint="tvtool writes a new directory; choose another path")
    if not target.parent.is_dir():
        raise InvalidInputError(f"the parent directory of {directory!r} does not exist")
    return target



def write_directory(directory: str, fill: Callable[[Path], None], *,
                    inputs: Sequence[str] = (), prefix: str = ".tvtool-dir-") -> None:
    """Create ``directory`` all or nothing: ``fill`` writes into a private staging directory.

    The staging directory sits beside ``directory`` and is renamed into place once ``fill``
    returns, so readers find either the complete directory or nothing.

    Raises:
        InvalidInputError: ``directory`` exists with content, or an input lies inside it.
        TvtoolError: a write failed (nothing is left behind).
    """
    target = check_new_directory(directory)
    for item in inputs:
        if item and item != STDIO and target.resolve() in Path(item).expanduser().resolve(
                ).parents:
            raise InvalidInputError(f"input {item!r} lies inside the output directory")
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=str(target.parent)))
    try:
        fill(staging)
        # mkdtemp creates the directory 0700 (private while it is filled); the result gets
        # the permissions mkdir would give it, as its files get those of open().
        os.chmod(staging, 0o777 & ~current_umask())
        if target.exists():
            target.rmdir()  # checked empty above
        os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise os_error(exc, f"writing {directory!r}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

def write_open_clip_dir(
    directory: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    layout: Sequence[TensorInfo],
    metadata: Mapping[str, str],
    config: Mapping[str, Any],
    readme: str,
    *,
    inputs: Sequence[str] = (),
) -> list[str]:
    """Write an open_clip Hugging Face model directory, all or nothing.

    The layout is open_clip's ``save_for_hf``: ``open_clip_model.safetensors`` (the state
    dict), ``open_clip_config.json`` and a ``README.md`` model card, so that
    ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads it, and
    ``huggingface-cli upload ORG/NAME DIR`` publishes it for ``hf-hub:ORG/NAME``. The files are
    written to a private directory beside ``directory`` that is renamed into place at the end.

    Returns:
        The names of the files written.

    Raises:
        InvalidInputError: ``directory`` exists with content, or an input lies inside it.
        TvtoolError: a write failed (nothing is left behind).
    """
    def fill(staging: Path) -> None:
        write_tensors(str(staging / OPEN_CLIP_WEIGHTS), tensors, metadata, layout=layout,
                      inputs=inputs, check_finite=False)
        write_json(str(staging / OPEN_CLIP_CONFIG), dict(config))
        write_bytes(str(staging / MODEL_CARD), readme.encode("utf-8"))

    write_directory(directory, fill, inputs=inputs, prefix=".tvtool-hf-")
    return [OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG, MODEL_CARD]
