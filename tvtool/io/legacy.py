"""Pickled PyTorch checkpoints -> state dicts, without executing pickle code.

The public task-vector code bases published their fine-tuned models as ``torch.save`` files:
either state dicts, or whole pickled ``ImageEncoder`` modules that wrap an open_clip model as
``.model``. :mod:`tvtool.io.unpickle` reads them with a restricted unpickler (every class left
inert); this module then walks the object graph: a stub whose recorded state has
``_parameters``, ``_buffers`` and ``_modules`` is an ``nn.Module``, and its tensors get dotted
names exactly as ``state_dict()`` would give them (non-persistent buffers are left out).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tvtool.errors import InvalidInputError
from tvtool.io.atomic import STDIO
from tvtool.io.documents import input_file, spooled_stdin
from tvtool.io.names import strip_wrapper_prefixes
from tvtool.io.safetensors_io import open_tensors
from tvtool.io.unpickle import Stub, bad, read_root_file
from tvtool.types import StateDict

# Keys under which training scripts commonly nest the weights of a checkpoint dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "image_encoder", "net")


# ---------------------------------------------------------------- walking the object graph


def _module_state(obj: Any) -> dict[str, Any] | None:
    """The recorded ``__dict__`` of a pickled ``nn.Module``, or None for anything else."""
    if not isinstance(obj, Stub):
        return None
    state = obj.stub_state
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    if isinstance(state, dict) and isinstance(state.get("_parameters"), dict) \
            and isinstance(state.get("_modules"), dict):
        return state
    return None


def describe(obj: Any) -> str:
    """What an unpickled object is, for messages (a stub by the class the file named)."""
    if isinstance(obj, Stub):
        return type(obj).qualified_name()
    return type(obj).__name__


def _walk_module(root: Any, label: str) -> StateDict:
    out: StateDict = {}
    stack: list[tuple[str, Any]] = [("", root)]
    seen: set[int] = set()
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue  # a module reachable twice is stored once, like state_dict(keep_vars)
        seen.add(id(module))
        state = _module_state(module)
        if state is None:
            raise bad(f"{label}: submodule {prefix.rstrip('.') or '<root>'} is a "
                       f"{describe(module)}, not a module")
        buffers = state.get("_buffers") or {}
        skip = state.get("_non_persistent_buffers_set") or set()
        for group, entries in (("parameter", state["_parameters"]), ("buffer", buffers)):
            if not isinstance(entries, dict):
                raise bad(f"{label}: malformed {group} table in {prefix or '<root>'}")
            for name, value in entries.items():
                if value is None or (group == "buffer" and name in skip):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise bad(f"{label}: {group} {prefix}{name} is a {describe(value)}, "
                               "not a tensor")
                out[f"{prefix}{name}"] = value
        children = [(f"{prefix}{name}.", sub) for name, sub in state["_modules"].items()
                    if sub is not None]
        stack.extend(reversed(children))
    return out


def _flat_tensors(mapping: Mapping[Any, Any]) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                 for k, v in mapping.items())


def _collect(root: Any, label: str) -> tuple[StateDict, str]:
    """Tensors of a checkpoint's root object, and how they were found."""
    if _module_state(root) is not None:
        return _walk_module(root, label), f"pickled module {describe(root)}"
    if isinstance(root, dict):
        if _flat_tensors(root):
            return dict(root), "state dict"
        for key in _NESTED_KEYS:
            inner = root.get(key)
            if inner is None:
                continue
            if _module_state(inner) is not None:
                return _walk_module(inner, label), f"pickled module {describe(inner)} " \
                                                   f"under {key!r}"
            if isinstance(inner, dict) and _flat_tensors(inner):
                return dict(inner), f"state dict under {key!r}"
        keys = [repr(k) for k in list(root)[:5]]
        tensors = sum(1 for v in root.values() if isinstance(v, torch.Tensor))
        raise bad(f"{label} holds a dict ({len(root)} entries, {tensors} tensors, keys "
                   f"{', '.join(keys)}) that is neither a state dict nor a module",
                   hint=f"tvtool looks for the weights under {', '.join(_NESTED_KEYS)}")
    if isinstance(root, torch.Tensor):
        raise bad(f"{label} holds a single tensor, not a model", hint=None)
    raise bad(f"{label} holds a {describe(root)}, neither a state dict nor an nn.Module",
               hint=None)


# ---------------------------------------------------------------- public API


@dataclass(frozen=True)
class LegacyCheckpoint:
    """Tensors read from a pickled checkpoint, under open_clip state-dict names.

    Attributes:
        tensors: Name -> tensor, wrapper prefixes removed.
        container: What the file held (``state dict``, ``pickled module X``...).
        stripped_prefix: The wrapper prefix removed from every name (``""`` if none).
        classes: ``module.name`` of every global the file named (all of them left inert);
            used to recognise the activation function of a pickled model.
        notes: Remarks for the user.
    """

    tensors: StateDict
    container: str
    stripped_prefix: str = ""
    classes: frozenset[str] = frozenset()
    notes: tuple[str, ...] = field(default_factory=tuple)


def read_pickled_checkpoint(path: str) -> LegacyCheckpoint:
    """Read a pickled ``.pt``/``.pth``/``.bin`` checkpoint with the restricted unpickler.

    Args:
        path: Checkpoint path, or ``-`` for stdin.

    Returns:
        The tensors (names normalised) and what the file held.

    Raises:
        InvalidInputError: the file is missing, corrupt, or holds no recognisable weights.
    """
    return _read_any(path, allow_safetensors=False)


def read_checkpoint(path: str) -> LegacyCheckpoint:
    """Read model weights from a pickled checkpoint or a safetensors file.

    Like :func:`read_pickled_checkpoint`, but a safetensors file (an open_clip or Hugging Face
    export without tvtool metadata, or a tvtool checkpoint) is accepted too.

    Raises:
        InvalidInputError: the file is missing, corrupt, a tvtool file of another kind, or
            holds no recognisable weights.
    """
    return _read_any(path, allow_safetensors=True)


def _read_any(path: str, *, allow_safetensors: bool) -> LegacyCheckpoint:
    if path == STDIO:
        with spooled_stdin(".pt") as tmp:
            return _read_file(tmp, "stdin", allow_safetensors)
    return _read_file(input_file(path), repr(path), allow_safetensors)


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


def _read_safetensors(file: Path, label: str) -> tuple[StateDict, str]:
    source = open_tensors(str(file))
    try:
        kind = source.metadata.get("tvtool.kind")
        if kind is not None and kind != "checkpoint":
            raise InvalidInputError(f"{label} is a tvtool {kind}, not a model checkpoint")
        names = source.keys()
        return {name: source.get(name) for name in names}, "safetensors file"
    finally:
        source.close()


def _read_file(file: Path, label: str, allow_safetensors: bool) -> LegacyCheckpoint:
    size = file.stat().st_size
    if size == 0:
        raise bad(f"{label} is empty")
    with open(file, "rb") as handle:
        head = handle.read(9)
    if allow_safetensors and _looks_like_safetensors(head):
        tensors, container = _read_safetensors(file, label)
        classes: set[str] = set()
    else:
        root, classes = read_root_file(file, label, size)
        tensors, container = _collect(root, label)
    if not tensors:
        raise bad(f"{label} holds no tensors", hint=None)
    mapping, prefix = strip_wrapper_prefixes(list(tensors))
    notes = [f"read {len(tensors)} tensors from a {container}"]
    if prefix:
        notes.append(f"normalised {len(mapping)} names by removing the {prefix!r} prefix")
    renamed = {mapping[name]: _own_storage(tensor) for name, tensor in tensors.items()}
    return LegacyCheckpoint(renamed, container, prefix, frozenset(classes), tuple(notes))


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    # Views into a shared storage become independent, contiguous tensors; a tensor that is
    # its whole storage already is one, and copying it would double the memory of a model.
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if tensor.is_contiguous() and tensor.storage_offset() == 0 and whole:
        return tensor.detach()
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def load_legacy(path: str) -> StateDict:
    """Load the tensors of a pickled checkpoint without executing pickle code.

    Args:
        path: Checkpoint path (or ``-``).

    Returns:
        The flat state dict (wrapper prefixes ``module.``/``model.`` removed).

    Raises:
        InvalidInputError: if the file is missing, corrupt, or holds no recognisable weights.
    """
    return read_pickled_checkpoint(path).tensors


def read_pickled_dict(path: str) -> dict[str, Any]:
    """Read a pickled dict of tensors and plain values (strings, numbers) without running code.

    Some checkpoints store a state dict next to bookkeeping values, e.g. tangent_task_arithmetic's
    linearized encoders (``model.params.N``, ``model.params0.N`` and ``model_name``), which
    :func:`read_pickled_checkpoint` refuses as "neither a state dict nor a module". Tensors
    are returned as independent contiguous tensors, names as stored (no prefix removed).

    Raises:
        InvalidInputError: unreadable file, or a root that is not such a dict (anything the
            restricted unpickler left inert is refused too).
    """
    file = input_file(path)
    label = repr(path)
    size = file.stat().st_size
    if size == 0:
        raise bad(f"{label} is empty")
    root, _ = read_root_file(file, label, size)
    if not isinstance(root, dict):
        raise bad(f"{label} holds a {describe(root)}, not a dict", hint=None)
    out: dict[str, Any] = {}
    for key, value in root.items():
        if not isinstance(key, str):
            raise bad(f"{label} holds a dict with a non-string key {key!r:.40}", hint=None)
        if isinstance(value, torch.Tensor):
            out[key] = _own_storage(value)
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        else:
            raise bad(f"{label}: entry {key!r:.60} is a {describe(value)}, neither a tensor "
                       "nor a plain value", hint=None)
    return out
