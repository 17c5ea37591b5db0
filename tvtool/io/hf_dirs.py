"""Hugging Face model directories: finding the files of a ``transformers`` export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvtool.errors import InvalidInputError
from tvtool.io.atomic import STDIO
from tvtool.io.safetensors_io import read_json

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
