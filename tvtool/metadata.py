"""The ``tvtool.*`` metadata stored in every safetensors file tvtool writes.

See docs/format.md for the specification.
"""

from __future__ import annotations

import functools
import json
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from tvtool import __version__
from tvtool.errors import InvalidInputError
from tvtool.limits import loads_json

PREFIX = "tvtool."
FORMAT_VERSION = "1"

FACTORS_KEY = "factors"
"""``tvtool.factors``: how a vector's low-rank factors make its dense delta, when the file
stores factors whatever its mode (see docs/format.md, "Compressed vectors")."""
SVD_FACTORS = "svd"
"""``tvtool.factors=svd`` (written by ``tvtool compress``): ΔW = B·A, with no alpha/r scale;
ranks may differ from tensor to tensor."""


class Kind(str, Enum):
    """What a tvtool file holds."""

    TASK_VECTOR = "task_vector"
    CHECKPOINT = "checkpoint"
    COEFFICIENTS = "coefficients"
    HEAD = "head"


class Mode(str, Enum):
    """How a task vector was fine-tuned, and what that makes of its file.

    Each mode declares, on its one line:

    * ``linearized``: its vectors are changes of the linearized model and are evaluated as
      one (``tvtool.linearized=true``);
    * ``factored``: its files store LoRA factors, not dense deltas; every command turns them
      into dense deltas with :func:`tvtool.formats.dense_source`.
    """

    linearized: bool
    factored: bool

    def __new__(cls, value: str, linearized: bool = False, factored: bool = False) -> Mode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.linearized = linearized
        member.factored = factored
        return member

    FULL = ("full",)
    ATTN = ("attn",)
    LINEAR = ("linear", True)
    LORA = ("lora", False, True)
    LLORA = ("llora", False, True)
    LLORA_NET = ("llora-net", True, True)

_KNOWN = {"format_version", "kind", "architecture", "base_ref", "base_fingerprint", "mode",
          "linearized", "dataset", "provenance"}


@dataclass(frozen=True)
class FileMeta:
    """Parsed ``tvtool.*`` metadata of one file.

    Attributes:
        kind: What the file holds.
        architecture: open_clip model name of the base (e.g. ``ViT-B-32``, ``tvtool-tiny``).
        base_ref: Model reference of the base as the user gave it.
        base_fingerprint: Hash of the base tensors (see :func:`tvtool.models.fingerprint`).
        mode: Fine-tuning mode of a task vector.
        linearized: Whether the vector must be evaluated as a linearized model.
        dataset: Dataset the vector was trained on, if known.
        provenance: Command, arguments, versions and seed that produced the file.
        extra: Any other ``tvtool.*`` keys (without the prefix), kept verbatim.
    """

    kind: Kind
    architecture: str | None = None
    base_ref: str | None = None
    base_fingerprint: str | None = None
    mode: Mode | None = None
    linearized: bool = False
    dataset: str | None = None
    provenance: dict[str, Any] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def factored(self) -> bool:
        """Whether the file stores low-rank factors (``T.lora_A``/``T.lora_B``), not deltas.

        True for the LoRA modes (their ``Mode.factored``) and for vectors of any mode
        compressed by ``tvtool compress`` (``tvtool.factors=svd``). Every command turns such
        factors into dense deltas with :func:`tvtool.formats.dense_source`.
        """
        return (self.mode is not None and self.mode.factored) or \
            self.extra.get(FACTORS_KEY) == SVD_FACTORS

    def to_header(self) -> dict[str, str]:
        """Serialise to the str->str mapping stored in the safetensors header."""
        # Extra keys first, so they can never override the fields that follow.
        out: dict[str, str] = {PREFIX + key: value for key, value in self.extra.items()
                               if key not in _KNOWN}
        out.update({PREFIX + "format_version": FORMAT_VERSION,
                    PREFIX + "kind": self.kind.value,
                    PREFIX + "linearized": "true" if self.linearized else "false"})
        for key in ("architecture", "base_ref", "base_fingerprint", "dataset"):
            value = getattr(self, key)
            if value is not None:
                out[PREFIX + key] = str(value)
        if self.mode is not None:
            out[PREFIX + "mode"] = self.mode.value
        if self.provenance is not None:
            out[PREFIX + "provenance"] = json.dumps(self.provenance, sort_keys=True, default=str)
        return out

    def with_changes(self, **changes: Any) -> FileMeta:
        """Return a copy with some fields replaced."""
        return replace(self, **changes)

    @classmethod
    def from_header(cls, header: Mapping[str, str], label: str) -> FileMeta:
        """Parse and validate ``tvtool.*`` metadata.

        Args:
            header: The safetensors ``__metadata__`` mapping.
            label: How to name the file in error messages.

        Raises:
            InvalidInputError: if the file has no tvtool metadata or it is malformed.
        """
        ours = {k[len(PREFIX):]: v for k, v in header.items() if k.startswith(PREFIX)}
        if "kind" not in ours:
            raise InvalidInputError(
                f"{label} has no tvtool metadata (tvtool.kind)",
                hint="is it a plain open_clip checkpoint? pass it where a model reference is "
                     "expected, or create a task vector with `tvtool extract`",
            )
        version = ours.get("format_version", "")
        if version != FORMAT_VERSION:
            raise InvalidInputError(f"{label} has tvtool format version {version[:20]!r}; this "
                                    f"tvtool reads version {FORMAT_VERSION}",
                                    hint="upgrade tvtool")
        try:
            kind = Kind(ours["kind"])
        except ValueError:
            raise InvalidInputError(
                f"{label} has unknown tvtool.kind {ours['kind'][:60]!r}") from None
        mode = None
        if "mode" in ours:
            try:
                mode = Mode(ours["mode"])
            except ValueError:
                raise InvalidInputError(
                    f"{label} has unknown tvtool.mode {ours['mode'][:60]!r}") from None
        linearized_text = ours.get("linearized", "false")
        if linearized_text not in ("true", "false"):
            raise InvalidInputError(f"{label} has tvtool.linearized={linearized_text[:20]!r}, "
                                    "expected 'true' or 'false'")
        provenance = None
        if "provenance" in ours:
            provenance = loads_json(ours["provenance"], f"{label}: tvtool.provenance")
            if not isinstance(provenance, dict):
                raise InvalidInputError(f"{label}: tvtool.provenance must be a JSON object")
        extra = {k: v for k, v in ours.items() if k not in _KNOWN}
        return cls(kind=kind, architecture=ours.get("architecture"),
                   base_ref=ours.get("base_ref"), base_fingerprint=ours.get("base_fingerprint"),
                   mode=mode, linearized=linearized_text == "true", dataset=ours.get("dataset"),
                   provenance=provenance, extra=extra)


def provenance(command: str, arguments: Mapping[str, Any], seed: int | None = None, *,
               inputs: Sequence[Mapping[str, Any]] | None = None, timed: bool = True,
               **records: Any) -> dict[str, Any]:
    """Build the provenance record stored with every output.

    Args:
        command: Subcommand name.
        arguments: The command's resolved configuration.
        seed: Random seed, if the command used one.
        inputs: One :func:`input_record` per tvtool file the output was made from, in order.
        timed: Record ``time`` (:func:`creation_time`). JSON reports leave it out, so that
            they are byte-identical across runs of the same inputs.
        **records: Further records: ``dataset`` / ``datasets`` (where the examples came from),
            ``search`` (a coefficient search that chose the output's coefficient).

    Returns:
        ``{"command", "arguments", "seed", "versions", ["time"], ["inputs"], ...}``.
    """
    import torch

    record: dict[str, Any] = {
        "command": command,
        "arguments": dict(arguments),
        "seed": seed,
        "versions": {"tvtool": __version__, "torch": torch.__version__,
                     "open_clip": _distribution_version("open_clip_torch"),
                     "python": sys.version.split()[0], "platform": platform.platform()},
    }
    if timed:
        record["time"] = creation_time()
    if inputs is not None:
        record["inputs"] = [dict(item) for item in inputs]
    record.update({key: value for key, value in records.items() if value is not None})
    return record


SOURCE_DATE_EPOCH = "SOURCE_DATE_EPOCH"
"""The reproducible-builds variable: when set, the time every output records."""


def creation_time() -> str:
    """The time recorded in a file's provenance: UTC, ISO 8601, to the second.

    ``SOURCE_DATE_EPOCH`` (seconds since 1970, https://reproducible-builds.org) replaces the
    clock when set, so that runs of the same inputs write byte-identical files.

    Raises:
        InvalidInputError: ``SOURCE_DATE_EPOCH`` is not a non-negative integer.
    """
    import datetime
    import os

    text = os.environ.get(SOURCE_DATE_EPOCH)
    if text is not None and text.strip():
        if not text.strip().isdigit() or len(text.strip()) > 12:
            raise InvalidInputError(f"{SOURCE_DATE_EPOCH}={text[:20]!r} is not a number of "
                                    "seconds since 1970", hint="e.g. SOURCE_DATE_EPOCH=0")
        moment = datetime.datetime.fromtimestamp(int(text), tz=datetime.timezone.utc)
    else:
        moment = datetime.datetime.now(tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.cache
def _distribution_version(name: str) -> str | None:
    """An installed distribution's version, without importing it (open_clip is slow)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


MAX_LINEAGE_DEPTH = 8
"""Generations of inputs a lineage keeps; older ones are cut (``"truncated": true``).

Each generation nests three JSON levels; eight stay well inside the 64 levels a reader accepts
(:data:`tvtool.limits.MAX_NESTING`) and keep headers small.
"""


def input_record(path: str, meta: FileMeta | None, fingerprint: str | None,
                 **fields: Any) -> dict[str, Any]:
    """What an output records about one file it was made from (``provenance.inputs[]``).

    Args:
        path: The path as given (``-`` for stdin).
        meta: The input's tvtool metadata (None for a plain checkpoint).
        fingerprint: ``sha256:`` of the input's tensors as stored (see
            :func:`tvtool.io.fingerprint`).
        **fields: Further facts, e.g. ``role`` (``finetuned``, ``vector``) or ``coef``.

    Returns:
        ``{"file", "fingerprint", "kind", ...fields, "lineage"}``; ``lineage`` is the input's
        own chain (:func:`lineage`), so that a file records how every ancestor was made.
    """
    record: dict[str, Any] = {"file": path, "fingerprint": fingerprint,
                              "kind": meta.kind.value if meta is not None else None}
    record.update(fields)
    if meta is not None:
        record["lineage"] = lineage(meta)
    return record


def lineage(meta: FileMeta, depth: int = 0) -> dict[str, Any]:
    """The chain that made a file, from its metadata: command, base, data, merge, inputs.

    Compact (no arguments or versions, which stay in the file's own provenance); nested
    through ``inputs[].lineage`` to :data:`MAX_LINEAGE_DEPTH` generations.
    """
    prov = meta.provenance or {}
    record: dict[str, Any] = {"command": prov.get("command"), "kind": meta.kind.value}
    for key in ("base_ref", "base_fingerprint", "dataset"):
        if getattr(meta, key) is not None:
            record[key] = getattr(meta, key)
    if meta.mode is not None:
        record["mode"] = meta.mode.value
    if prov.get("time"):
        record["time"] = prov["time"]
    if "merge_method" in meta.extra:
        coefficients = _loads_or_text(meta.extra.get("coefficients"))
        if isinstance(coefficients, dict) and isinstance(coefficients.get("values"), dict):
            # Per-tensor values (a learn-coeffs file) stay in the merged file's own record.
            coefficients = {k: v for k, v in coefficients.items() if k != "values"}
        record["merge"] = {"method": meta.extra["merge_method"],
                           "params": _loads_or_text(meta.extra.get("merge_params")),
                           "coefficients": coefficients}
    if "operations" in meta.extra:
        record["operations"] = _loads_or_text(meta.extra["operations"])
    if isinstance(prov.get("search"), dict):
        search = prov["search"]
        record["search"] = {k: search[k] for k in ("best_coef", "criterion", "split",
                                                    "datasets", "controls", "target")
                            if k in search}
    data = prov.get("dataset")
    if isinstance(data, dict):
        manifest = data.get("manifest")
        record["data"] = data.get("source") or (
            manifest.get("source") if isinstance(manifest, dict) else None)
    inputs = prov.get("inputs")
    if isinstance(inputs, list) and inputs:
        if depth + 1 >= MAX_LINEAGE_DEPTH:
            record["inputs"] = [{"truncated": True}]
        else:
            record["inputs"] = [_cut(item, depth + 1) for item in inputs
                                if isinstance(item, dict)]
    return record


def _cut(item: dict[str, Any], depth: int) -> dict[str, Any]:
    """An input record whose nested lineage keeps at most the allowed generations."""
    out = {k: v for k, v in item.items() if k != "lineage"}
    nested = item.get("lineage")
    if isinstance(nested, dict):
        inner = {k: v for k, v in nested.items() if k != "inputs"}
        children = nested.get("inputs")
        if isinstance(children, list) and children:
            inner["inputs"] = ([{"truncated": True}] if depth + 1 >= MAX_LINEAGE_DEPTH
                               else [_cut(c, depth + 1) for c in children
                                     if isinstance(c, dict)])
        out["lineage"] = inner
    return out


def _loads_or_text(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return loads_json(text, "tvtool metadata")
    except InvalidInputError:
        return text
