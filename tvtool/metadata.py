"""The ``tvtool.*`` metadata stored in every safetensors file tvtool writes.

See docs/format.md for the specification.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Mapping
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


def provenance(command: str, arguments: Mapping[str, Any], seed: int | None = None
               ) -> dict[str, Any]:
    """Build the provenance record stored with every output.

    Args:
        command: Subcommand name.
        arguments: The command's resolved configuration.
        seed: Random seed, if the command used one.
    """
    import torch

    return {
        "command": command,
        "arguments": dict(arguments),
        "seed": seed,
        "versions": {"tvtool": __version__, "torch": torch.__version__,
                     "python": sys.version.split()[0], "platform": platform.platform()},
    }
