"""Zero-shot classification heads, cached in memory and on disk.

A head depends only on the text encoder of the base, the class names and the prompt templates,
so it is keyed by (base fingerprint, dataset, class names, templates). Task vectors never change
the head: as in the task-arithmetic papers, fine-tuning freezes it, and every edited model is
scored with the head of the base it edits.

On disk a head is a safetensors file of kind ``head`` under ``cache_dir()/heads`` holding one
tensor, ``head`` (``[num_classes, embed_dim]``, logit scale folded in).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tvtool.errors import InvalidInputError, TvtoolError
from tvtool.io import ensure_directory, open_tensors, write_tensors
from tvtool.limits import short_list
from tvtool.metadata import FileMeta, Kind
from tvtool.models import ClipBundle, build_zero_shot_head, cache_dir

HEAD_TENSOR = "head"
"""Name of the tensor in a head file."""

Template = str | Callable[[str], str]

_MEMORY: dict[str, torch.Tensor] = {}


@dataclass(frozen=True)
class HeadKey:
    """What a zero-shot head is a function of.

    Attributes:
        base_fingerprint: Fingerprint of the base tensors (text encoder included).
        dataset: Dataset name, for messages and file metadata.
        classnames: Class names in label order.
        templates: Prompt templates as text (callables rendered on ``"{}"``).
    """

    base_fingerprint: str
    dataset: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def digest(self) -> str:
        """Stable hex digest used as the cache file name."""
        text = json.dumps([self.base_fingerprint, self.dataset, self.classnames, self.templates],
                          ensure_ascii=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def template_text(template: Template) -> str:
    """A template as text: strings as they are, callables applied to ``"{}"``."""
    return template if isinstance(template, str) else str(template("{}"))


def head_key(base_fingerprint: str, dataset: str, classnames: Sequence[str],
             templates: Sequence[Template]) -> HeadKey:
    """Build the cache key of a head."""
    return HeadKey(base_fingerprint, dataset, tuple(classnames),
                   tuple(template_text(t) for t in templates))


def heads_dir() -> Path:
    """Directory of the on-disk head cache."""
    return cache_dir() / "heads"


def zero_shot_head(
    bundle: ClipBundle,
    key: HeadKey,
    templates: Sequence[Template],
    *,
    device: str | torch.device = "cpu",
    disk_cache: bool = True,
    log: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """Return the zero-shot head for ``key``, building it with the text encoder if needed.

    Looks in memory, then on disk, then builds and stores in both. ``bundle`` must hold the
    base weights ``key.base_fingerprint`` names; callers build heads before loading edited
    weights into the model.

    Args:
        bundle: The base model (its text tower embeds the prompts).
        key: Cache key (see :func:`head_key`).
        templates: The templates as given by the dataset (strings or callables).
        device: Device for the text forward passes.
        disk_cache: Read and write the on-disk cache.
        log: Where to report cache problems (stderr in the CLI).

    Returns:
        ``[num_classes, embed_dim]`` float32 tensor on CPU.

    Raises:
        InvalidInputError: a dataset with no class names or no templates.
    """
    if not key.classnames:
        raise InvalidInputError(f"dataset {key.dataset!r} has no class names")
    if not key.templates:
        raise InvalidInputError(f"dataset {key.dataset!r} has no prompt templates")
    digest = key.digest
    if digest in _MEMORY:
        return _MEMORY[digest]
    path = heads_dir() / f"{digest}.safetensors"
    head = _read_cached(path, key, log) if disk_cache else None
    if head is None:
        head = build_zero_shot_head(bundle, key.classnames, list(templates), device=device)
        if disk_cache:
            _write_cached(path, head, key, log)
    _MEMORY[digest] = head
    return head


def clear_memory_cache() -> None:
    """Forget the heads held in memory (tests, long-running processes)."""
    _MEMORY.clear()


def head_metadata(key: HeadKey) -> dict[str, str]:
    """The safetensors header of a head file."""
    meta = FileMeta(kind=Kind.HEAD, base_fingerprint=key.base_fingerprint, dataset=key.dataset,
                    extra={"classnames": json.dumps(list(key.classnames)),
                           "templates": json.dumps(list(key.templates))})
    return meta.to_header()


def read_head_file(path: str, *, num_classes: int | None = None,
                   base_fingerprint: str | None = None) -> torch.Tensor:
    """Read a head file (kind ``head``) and check it fits the data and the base.

    Args:
        path: Head file (``.safetensors``).
        num_classes: Class count of the dataset it will score, if known.
        base_fingerprint: Fingerprint of the base, if the head must come from it.

    Returns:
        The ``[num_classes, embed_dim]`` head as float32.

    Raises:
        InvalidInputError: not a head file, wrong shape, class count or base.
    """
    source = open_tensors(path)
    try:
        meta = FileMeta.from_header(source.metadata, source.label)
        if meta.kind is not Kind.HEAD:
            raise InvalidInputError(f"{source.label} is a tvtool {meta.kind.value}, not a head")
        if source.keys() != [HEAD_TENSOR]:
            raise InvalidInputError(f"{source.label} must hold exactly one tensor named "
                                    f"{HEAD_TENSOR!r}, found {short_list(source.keys(), 3)}")
        head = source.get(HEAD_TENSOR)
    finally:
        source.close()
    if head.ndim != 2 or not head.is_floating_point():
        raise InvalidInputError(f"{path!r}: a head must be a 2-D floating tensor, got "
                                f"{head.dtype} {tuple(head.shape)}")
    if num_classes is not None and head.shape[0] != num_classes:
        raise InvalidInputError(
            f"{path!r} scores {head.shape[0]} classes, the dataset has {num_classes}",
            hint="use the head built for this dataset, or check the dataset's class names")
    if base_fingerprint and meta.base_fingerprint and meta.base_fingerprint != base_fingerprint:
        raise InvalidInputError(
            f"{path!r} was built from another base (fingerprint {meta.base_fingerprint[:19]}… "
            f"vs {base_fingerprint[:19]}…)", hint="build heads with the base you evaluate")
    return head.float()


def _read_cached(path: Path, key: HeadKey,
                 log: Callable[[str], None] | None) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        head = read_head_file(str(path), num_classes=len(key.classnames),
                              base_fingerprint=key.base_fingerprint)
    except TvtoolError as exc:
        # A damaged cache entry is rebuilt, never trusted and never fatal.
        if log is not None:
            log(f"ignoring cached head {path}: {exc.one_line()}")
        return None
    return head


def _write_cached(path: Path, head: torch.Tensor, key: HeadKey,
                  log: Callable[[str], None] | None) -> None:
    try:
        # The io writer refuses a missing directory (a safety net for user outputs); the cache
        # directory is ours to create.
        ensure_directory(str(path.parent))
        write_tensors(str(path), {HEAD_TENSOR: head.contiguous()}, head_metadata(key))
    except (OSError, TvtoolError) as exc:
        # The cache is an optimisation: a read-only or full disk must not fail an evaluation.
        if log is not None:
            message = exc.one_line() if isinstance(exc, TvtoolError) else str(exc)
            log(f"could not cache the head of {key.dataset!r}: {message}")
