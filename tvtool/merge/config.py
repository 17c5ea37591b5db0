"""The merge configuration: one frozen object, a YAML/JSON schema, and round-tripping.

A config file reproduces a merge exactly (same inputs, method, parameters, coefficients and
seed give the same bytes); the resolved config is stored in the output's metadata
(``tvtool.merge_config``), so any merged vector says how to make it again.

Schema (docs/merge.md has an example)::

    version: 1                      # optional; must be 1
    vectors:                        # required, non-empty
      - cars.safetensors            # a path ...
      - {path: dtd.safetensors, coef: 0.4}   # ... or a path with its own coefficient
    method: ties                    # default task_arithmetic
    params: {density: 0.2, trim: global}     # the method's hyper-parameters
    coef: 0.3                       # one for all, or a list with one per vector
    coefs_file: coefs.safetensors   # instead of coef: JSON list/dict or coefficients file
    seed: 0
    missing: refuse                 # refuse | zero | common
    allow_base_mismatch: false
    mixed_modes_as: null            # null | linearized | nonlinear
    output: merged.safetensors      # optional; -o on the command line wins

Relative paths in a config file are relative to the file's directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvtool.errors import InvalidInputError
from tvtool.limits import check_nesting, short_repr

CONFIG_VERSION = 1
MISSING_POLICIES = ("refuse", "zero", "common")
MIXED_MODES = ("linearized", "nonlinear")

_KEYS = ("version", "vectors", "method", "params", "coef", "coefs_file", "seed", "missing",
         "allow_base_mismatch", "mixed_modes_as", "output")


@dataclass(frozen=True)
class MergeConfig:
    """Configuration of ``tvtool merge``.

    Attributes:
        vectors: Task-vector files (``-`` = stdin, at most once).
        output: Output path or ``-``.
        method: Registry name of the merge method.
        params: The method's hyper-parameters (validated by the method's params class).
        coefs: One coefficient for all vectors, or one per vector.
        coefs_file: JSON list/dict or tvtool coefficients file; replaces ``coefs``.
        seed: Random seed (DARE's masks).
        missing: Vectors with different tensors: ``refuse``, ``zero`` (an absent tensor is
            zero in that vector; the output has the union) or ``common`` (only the shared
            tensors are merged and written).
        allow_base_mismatch: Merge vectors whose base fingerprints differ.
        mixed_modes_as: Merge linearized with non-linearized vectors and record the result
            as ``linearized`` or ``nonlinear``; None refuses such a mix.

    """

    vectors: tuple[str, ...]
    output: str = "-"
    method: str = "task_arithmetic"
    params: dict[str, Any] = field(default_factory=dict)
    coefs: tuple[float, ...] = (1.0,)
    coefs_file: str | None = None
    seed: int = 0
    missing: str = "refuse"
    allow_base_mismatch: bool = False
    mixed_modes_as: str | None = None

    def to_document(self) -> dict[str, Any]:
        """Return the config as a plain document (what a config file holds)."""
        doc: dict[str, Any] = {"version": CONFIG_VERSION, "vectors": list(self.vectors),
                               "method": self.method, "params": dict(self.params)}
        if self.coefs_file is not None:
            doc["coefs_file"] = self.coefs_file
        else:
            doc["coef"] = self.coefs[0] if len(self.coefs) == 1 else list(self.coefs)
        doc.update(seed=self.seed, missing=self.missing,
                   allow_base_mismatch=self.allow_base_mismatch,
                   mixed_modes_as=self.mixed_modes_as, output=self.output)
        return doc

    def to_json(self) -> str:
        """Canonical JSON of :meth:`to_document` (stored in the output's metadata)."""
        return json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"))


def _fail(message: str, label: str) -> InvalidInputError:
    return InvalidInputError(f"merge config {label}: {message}",
                             hint="see docs/merge.md, section 'Config files'")


def _number(value: Any, what: str, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{what} must be a number, got {short_repr(value)}", label)
    try:
        number = float(value)
    except OverflowError:  # an integer with hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        raise _fail(f"{what} must be finite, got {short_repr(value)}", label)
    return number


def _string(value: Any, what: str, label: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(f"{what} must be a non-empty string, got {short_repr(value)}", label)
    return value


def _resolve(path: str, base_dir: Path | None) -> str:
    if path == "-" or base_dir is None or Path(path).expanduser().is_absolute():
        return path
    return str(base_dir / path)


def config_from_document(document: Any, *, label: str = "", base_dir: Path | None = None,
                         output: str | None = None) -> MergeConfig:
    """Validate a config document and build the :class:`MergeConfig`.

    Args:
        document: Parsed YAML/JSON.
        label: How to name the document in errors (e.g. the file name).
        base_dir: Directory relative paths are resolved against (the config file's); None
            keeps them as written.
        output: Output path that overrides the document's ``output``.

    Raises:
        InvalidInputError: unknown keys, missing ``vectors``, wrong types or values. Method
            parameters are checked later, against the method (UsageError).

    """
    label = label or "<document>"
    # Documents from read_yaml are bounded already; this covers documents built elsewhere.
    check_nesting(document, f"merge config {label}")
    if not isinstance(document, Mapping):
        raise _fail(f"must be a mapping, got {type(document).__name__}", label)
    unknown = sorted(short_repr(k, 40) for k in document if k not in _KEYS)
    if unknown:
        raise _fail(f"unknown key(s) {short_repr(unknown)}; known keys are {list(_KEYS)}",
                    label)
    version = document.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise _fail(f"version {short_repr(version)} is not supported (this tvtool reads version "
                    f"{CONFIG_VERSION})", label)
    raw_vectors = document.get("vectors")
    if not isinstance(raw_vectors, list) or not raw_vectors:
        raise _fail("'vectors' must be a non-empty list of paths", label)
    vectors: list[str] = []
    per_vector: list[float | None] = []
    for index, item in enumerate(raw_vectors):
        if isinstance(item, Mapping):
            extra = [k for k in item if k not in ("path", "coef")]
            if extra or "path" not in item:
                raise _fail(f"vectors[{index}] must be a path or {{path, coef}}, got "
                            f"{short_repr(dict(item))}", label)
            vectors.append(_resolve(_string(item["path"], f"vectors[{index}].path", label),
                                    base_dir))
            per_vector.append(_number(item["coef"], f"vectors[{index}].coef", label)
                              if "coef" in item else None)
        else:
            vectors.append(_resolve(_string(item, f"vectors[{index}]", label), base_dir))
            per_vector.append(None)
    method = _string(document.get("method", "task_arithmetic"), "method", label)
    params = document.get("params") or {}
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise _fail(f"'params' must be a mapping of names to values, got {short_repr(params)}",
                    label)
    given = [c for c in per_vector if c is not None]
    sources_of_coefs = sum([bool(given), "coef" in document,
                            document.get("coefs_file") is not None])
    if sources_of_coefs > 1:
        raise _fail("give coefficients in one way only: per-vector 'coef', top-level 'coef', "
                    "or 'coefs_file'", label)
    if given and len(given) != len(per_vector):
        raise _fail("either every vector entry has a 'coef' or none has", label)
    coefs: tuple[float, ...] = (1.0,)
    coefs_file = None
    if given:
        coefs = tuple(float(c) for c in given)  # type: ignore[arg-type]
    elif "coef" in document:
        raw = document["coef"]
        values = raw if isinstance(raw, list) else [raw]
        if not values:
            raise _fail("'coef' must not be an empty list", label)
        coefs = tuple(_number(v, "coef", label) for v in values)
    elif document.get("coefs_file") is not None:
        coefs_file = _resolve(_string(document["coefs_file"], "coefs_file", label), base_dir)
    seed = document.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise _fail(f"'seed' must be an integer in [0, 2**63), got {short_repr(seed)}", label)
    missing = document.get("missing", "refuse")
    if missing not in MISSING_POLICIES:
        raise _fail(f"'missing' must be one of {list(MISSING_POLICIES)}, got "
                    f"{short_repr(missing)}", label)
    allow = document.get("allow_base_mismatch", False)
    if not isinstance(allow, bool):
        raise _fail(f"'allow_base_mismatch' must be true or false, got {short_repr(allow)}",
                    label)
    mixed = document.get("mixed_modes_as")
    if mixed is not None and mixed not in MIXED_MODES:
        raise _fail(f"'mixed_modes_as' must be null or one of {list(MIXED_MODES)}, got "
                    f"{short_repr(mixed)}", label)
    out = output if output is not None else document.get("output")
    if out is None:
        raise _fail("no output: set 'output' or pass -o", label)
    out = _string(out, "output", label)
    if output is None:
        out = _resolve(out, base_dir)
    return MergeConfig(vectors=tuple(vectors), output=out, method=method, params=dict(params),
                       coefs=coefs, coefs_file=coefs_file, seed=seed, missing=missing,
                       allow_base_mismatch=allow, mixed_modes_as=mixed)


def load_config(path: str, *, output: str | None = None) -> MergeConfig:
    """Read and validate a YAML (or JSON) merge config file.

    Args:
        path: Config file (``-`` = stdin; relative paths then resolve against the cwd).
        output: Output path overriding the file's ``output``.

    Raises:
        InvalidInputError: unreadable file, invalid YAML, or a schema violation.

    """
    from tvtool.io.yaml_io import read_yaml

    document = read_yaml(path)
    base_dir = None if path == "-" else Path(path).expanduser().parent
    return config_from_document(document, label=repr(path), base_dir=base_dir, output=output)
