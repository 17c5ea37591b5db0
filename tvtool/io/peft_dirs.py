"""peft adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvtool.errors import InvalidInputError
from tvtool.io.atomic import STDIO
from tvtool.io.documents import read_json, write_bytes, write_json
from tvtool.io.hf_dirs import write_directory
from tvtool.io.safetensors_io import open_tensors, write_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
ADAPTER_CARD = "README.md"
_MEMBERS = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLED_WEIGHTS)


@dataclass(frozen=True)
class PeftAdapterFiles:
    """What a peft adapter directory holds.

    Attributes:
        directory: The directory.
        config: ``adapter_config.json``, parsed.
        tensors: The tensors of ``adapter_model.safetensors`` (peft's key names).
        metadata: That file's safetensors metadata (peft writes ``{"format": "pt"}``; tvtool
            adds ``tvtool.*`` keys when it exports).
        weights_path: The weights file read (an input of the command).
    """

    directory: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    weights_path: str


def _adapter_directory(path: str) -> Path | None:
    if path == STDIO:
        return None
    given = Path(path).expanduser()
    if given.is_dir():
        return given if (given / ADAPTER_CONFIG).is_file() else None
    if given.name in _MEMBERS and (given.parent / ADAPTER_CONFIG).is_file():
        return given.parent
    return None


def is_peft_adapter(path: str) -> bool:
    """Whether ``path`` is a peft adapter directory (or a file inside one).

    A directory counts when it holds ``adapter_config.json``; so does ``adapter_config.json``,
    ``adapter_model.safetensors`` or ``adapter_model.bin`` beside such a config.
    """
    return _adapter_directory(path) is not None


def adapter_weights_path(path: str) -> str:
    """The ``adapter_model.safetensors`` of an adapter directory (whether or not it exists).

    Raises:
        InvalidInputError: ``path`` is not a peft adapter directory.
    """
    directory = _adapter_directory(path)
    if directory is None:
        raise InvalidInputError(f"{path!r} is not a peft adapter directory (no {ADAPTER_CONFIG})")
    return str(directory / ADAPTER_WEIGHTS)


def read_peft_adapter(path: str) -> PeftAdapterFiles:
    """Read a peft adapter directory without unpickling anything.

    Raises:
        InvalidInputError: no ``adapter_config.json``, a config that is not a JSON object,
            only a pickled ``adapter_model.bin`` (never unpickled), no weights, or weights that
            are not valid safetensors.
    """
    directory = _adapter_directory(path)
    if directory is None:
        raise InvalidInputError(f"{path!r} is not a peft adapter directory (no {ADAPTER_CONFIG})")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (directory / PICKLED_WEIGHTS).is_file():
            raise InvalidInputError(
                f"{str(directory)!r} holds only {PICKLED_WEIGHTS}, a pickle, which tvtool never "
                "unpickles", hint="save the adapter with peft's save_pretrained("
                "safe_serialization=True) to get adapter_model.safetensors")
        raise InvalidInputError(f"{str(directory)!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    config = read_json(str(directory / ADAPTER_CONFIG))
    if not isinstance(config, dict):
        raise InvalidInputError(f"{str(directory / ADAPTER_CONFIG)!r} is not a JSON object")
    source = open_tensors(str(weights))
    try:
        tensors = {name: source.get(name) for name in source.keys()}
        metadata = dict(source.metadata)
    finally:
        source.close()
    return PeftAdapterFiles(str(directory), config, tensors, metadata, str(weights))


def write_peft_adapter(directory: str, config: Mapping[str, Any],
                       tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                       readme: str, *, inputs: Sequence[str] = ()) -> list[str]:
    """Write a peft adapter directory, all or nothing.

    ``adapter_config.json``, ``adapter_model.safetensors`` (with ``metadata``) and a
    ``README.md``, written to a private directory beside ``directory`` that is renamed into
    place at the end, so ``peft.PeftModel.from_pretrained(model, directory)`` finds either the
    complete adapter or nothing.

    Returns:
        The names of the files written.

    Raises:
        InvalidInputError: ``directory`` exists with content, or an input lies inside it.
        TvtoolError: a write failed (nothing is left behind).
    """
    def fill(staging: Path) -> None:
        write_tensors(str(staging / ADAPTER_WEIGHTS), dict(tensors), metadata, inputs=inputs)
        write_json(str(staging / ADAPTER_CONFIG), dict(config))
        write_bytes(str(staging / ADAPTER_CARD), readme.encode("utf-8"))

    write_directory(directory, fill, inputs=inputs, prefix=".tvtool-peft-")
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_CARD]
