"""The merge configuration: one frozen object, a YAML/JSON schema, and round-tripping.

A config file reproduces a merge exactly (same inputs, method, parameters, coefficients and
seed give the same bytes); the resolved config is stored in the output's metadata
(``tvtool.merge_config``), so any merged vector says how to make it again.

Schema (docs/merge.md has an example)::

    version: 1                      # optional; must be 1
    vectors:                        # required, non-empty
      - cars.safetensors            # a path ...
      - {path: dtd.safetensors, coef: 0.4}   # ... or a path with its own coefficient
      - {path: gtsrb.safetensors, density: 0.3}  # ... or parameters (MergeMethod.per_vector)
    method: ties                    # default task_arithmetic
    params: {density: 0.2, trim: global}     # the method's hyper-parameters
    coef: 0.3                       # one for all, or a list with one per vector
    coefs_file: coefs.safetensors   # instead of coef: JSON list/dict or coefficients file
    seed: 0
    missing: refuse                 # refuse | zero | common
    allow_base_mismatch: false
    mixed_modes_as: null            # null | linearized | nonlinear
    dtype: null                     # null (the inputs') | float32 | float16 | bfloat16 | float64
    output: merged.safetensors      # optional; -o on the command line wins

The keys of a whole job around the merge (``base``, ``apply``, ``sweep``...) are
:mod:`tvtool.merge.job`'s.

Relative paths in a config file are relative to the file's directory.

Constructing a :class:`MergeConfig` validates every value (the method and its parameters
included), whether the values come from the command's flags or from a document; a document
adds only its own structure checks (keys, version, vector entries, paths relative to it), and
its errors name the document.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvtool.errors import InvalidInputError, TvtoolError, UsageError
from tvtool.io.paths import confined_path
from tvtool.limits import check_nesting, short_repr
from tvtool.merge.registry import get_method
from tvtool.vectors import check_coefficients

CONFIG_VERSION = 1
MISSING_POLICIES = ("refuse", "zero", "common")
MIXED_MODES = ("linearized", "nonlinear")
DTYPES = ("float32", "float16", "bfloat16", "float64")
"""Storage dtypes of a merged vector (``dtype:``, ``--dtype``)."""

_KEYS = ("version", "vectors", "method", "params", "coef", "coefs_file", "seed", "missing",
         "allow_base_mismatch", "mixed_modes_as", "dtype", "output")
JOB_KEYS = ("base", "apply", "datasets", "suite", "sweep", "sweep_report")
"""The keys that make a config a job (:mod:`tvtool.merge.job`), besides the merge's own."""


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
        vector_params: Per vector, the method parameters it sets itself (e.g.
            ``{"density": 0.3}``; only those of :attr:`MergeMethod.per_vector`), over
            ``params``; empty, or one mapping per vector.
        dtype: Storage dtype of the merged tensors (:data:`DTYPES`); None keeps the inputs'
            promoted dtype.

    Raises:
        UsageError: on construction, for any invalid value (named by its config key); the
            method's parameters are checked by its params dataclass.

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
    vector_params: tuple[dict[str, Any], ...] = ()
    dtype: str | None = None

    def __post_init__(self) -> None:
        vectors = tuple(self.vectors) if isinstance(self.vectors, (list, tuple)) else None
        if not vectors:
            raise UsageError("no task vectors given",
                             hint="tvtool merge TV1 TV2 ... -o OUT, or 'vectors:' in a config")
        for index, path in enumerate(vectors):
            _string(path, f"vectors[{index}]")
        if vectors.count("-") > 1:
            raise UsageError("stdin ('-') can be given only once")
        object.__setattr__(self, "vectors", vectors)
        _string(self.output, "output")
        method = get_method(_string(self.method, "method"))
        if not isinstance(self.params, Mapping) or \
                not all(isinstance(k, str) for k in self.params):
            raise UsageError(f"'params' must be a mapping of names to values, got "
                             f"{short_repr(self.params)}")
        object.__setattr__(self, "params", dict(self.params))
        method.make_params(self.params)  # the method's params dataclass is the one check
        own = tuple(self.vector_params) if isinstance(self.vector_params, (list, tuple)) \
            else None
        if own is None or not all(isinstance(v, Mapping)
                                  and all(isinstance(k, str) for k in v) for v in own):
            raise UsageError(f"per-vector parameters must be mappings, got "
                             f"{short_repr(self.vector_params)}")
        if own and len(own) != len(vectors):
            raise UsageError(f"{len(own)} per-vector parameter sets for {len(vectors)} vectors")
        own = tuple(dict(v) for v in own) if any(own) else ()
        object.__setattr__(self, "vector_params", own)
        method.make_vector_params(self.params, own)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"'dtype' (--dtype) must be null or one of {list(DTYPES)}, got "
                             f"{short_repr(self.dtype)}")
        coefs = tuple(self.coefs) if isinstance(self.coefs, (list, tuple)) else (self.coefs,)
        if not coefs:
            raise UsageError("'coef' must not be an empty list")
        object.__setattr__(self, "coefs", check_coefficients(coefs, "coef"))
        if self.coefs_file is not None:
            _string(self.coefs_file, "coefs_file")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise UsageError(f"'seed' must be an integer in [0, 2**63), got {short_repr(seed)}")
        if self.missing not in MISSING_POLICIES:
            raise UsageError(f"'missing' must be one of {list(MISSING_POLICIES)}, got "
                             f"{short_repr(self.missing)}")
        if not isinstance(self.allow_base_mismatch, bool):
            raise UsageError(f"'allow_base_mismatch' must be true or false, got "
                             f"{short_repr(self.allow_base_mismatch)}")
        if self.mixed_modes_as is not None and self.mixed_modes_as not in MIXED_MODES:
            raise UsageError(f"'mixed_modes_as' (--mixed-modes-as) must be null or one of "
                             f"{list(MIXED_MODES)}, got {short_repr(self.mixed_modes_as)}")

    def to_document(self) -> dict[str, Any]:
        """Return the config as a plain document (what a config file holds)."""
        vectors: list[Any] = list(self.vectors)
        if self.vector_params:
            vectors = [{"path": path, **own} if own else path
                       for path, own in zip(self.vectors, self.vector_params, strict=True)]
        doc: dict[str, Any] = {"version": CONFIG_VERSION, "vectors": vectors,
                               "method": self.method, "params": dict(self.params)}
        if self.coefs_file is not None:
            doc["coefs_file"] = self.coefs_file
        else:
            doc["coef"] = self.coefs[0] if len(self.coefs) == 1 else list(self.coefs)
        doc.update(seed=self.seed, missing=self.missing,
                   allow_base_mismatch=self.allow_base_mismatch,
                   mixed_modes_as=self.mixed_modes_as, output=self.output)
        if self.dtype is not None:  # only when set: earlier records stay byte-identical
            doc["dtype"] = self.dtype
        return doc

    def to_json(self) -> str:
        """Canonical JSON of :meth:`to_document` (stored in the output's metadata)."""
        return json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"))


def _fail(message: str, label: str, hint: str | None = None) -> InvalidInputError:
    return InvalidInputError(f"merge config {label}: {message}",
                             hint=hint or "see docs/merge.md, section 'Config files'")


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what} must be a non-empty string, got {short_repr(value)}")
    return value


def _resolve(path: Any, base_dir: Path | None) -> Any:
    # Anything but a path string is left for MergeConfig to refuse.
    if not isinstance(path, str) or not path or path == "-" or base_dir is None \
            or Path(path).expanduser().is_absolute():
        return path
    return str(base_dir / path)


def config_from_document(document: Any, *, label: str = "", base_dir: Path | None = None,
                         output: str | None = None,
                         output_root: Path | None = None) -> MergeConfig:
    """Validate a config document and build the :class:`MergeConfig`.

    Args:
        document: Parsed YAML/JSON.
        label: How to name the document in errors (e.g. the file name).
        base_dir: Directory relative paths are resolved against (the config file's); None
            keeps them as written.
        output: Output path that overrides the document's ``output``.
        output_root: When given, the document's own ``output`` must stay inside this folder
            (see :func:`tvtool.io.paths.confined_path`); ``output`` is trusted as given.

    Raises:
        InvalidInputError: unknown keys, missing ``vectors``, wrong types or values, an
            unknown method or invalid method parameters (the checks of :class:`MergeConfig`,
            named by the document's label), an ``output`` outside ``output_root``.

    """
    label = label or "<document>"
    # Documents from read_yaml are bounded already; this covers documents built elsewhere.
    check_nesting(document, f"merge config {label}")
    if not isinstance(document, Mapping):
        raise _fail(f"must be a mapping, got {type(document).__name__}", label)
    unknown = sorted(short_repr(k, 40) for k in document if k not in _KEYS)
    if unknown:
        job = [k for k in document if k in JOB_KEYS]
        raise _fail(f"unknown key(s) {short_repr(unknown)}; known keys are {list(_KEYS)}",
                    label, hint=f"{short_repr(job)} belong to a whole job: read the file with "
                                "tvtool.merge.load_job" if job else None)
    version = document.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise _fail(f"version {short_repr(version)} is not supported (this tvtool reads version "
                    f"{CONFIG_VERSION})", label)
    raw_vectors = document.get("vectors")
    if not isinstance(raw_vectors, list) or not raw_vectors:
        raise _fail("'vectors' must be a non-empty list of paths", label)
    vectors: list[Any] = []
    per_vector: list[Any] = []
    own_params: list[dict[str, Any]] = []
    for index, item in enumerate(raw_vectors):
        if isinstance(item, Mapping):
            if "path" not in item:
                raise _fail(f"vectors[{index}] must be a path or {{path, coef, ...}}, got "
                            f"{short_repr(dict(item))}", label)
            vectors.append(_resolve(item["path"], base_dir))
            per_vector.append(item.get("coef"))
            # Anything else is a parameter of the method for this vector; MergeConfig
            # refuses one the method does not take per vector.
            own_params.append({k: v for k, v in item.items() if k not in ("path", "coef")})
        else:
            vectors.append(_resolve(item, base_dir))
            per_vector.append(None)
            own_params.append({})
    given = [c for c in per_vector if c is not None]
    sources_of_coefs = sum([bool(given), "coef" in document,
                            document.get("coefs_file") is not None])
    if sources_of_coefs > 1:
        raise _fail("give coefficients in one way only: per-vector 'coef', top-level 'coef', "
                    "or 'coefs_file'", label)
    if given and len(given) != len(per_vector):
        raise _fail("either every vector entry has a 'coef' or none has", label)
    coefs: Any = (1.0,)
    coefs_file = None
    if given:
        coefs = tuple(given)
    elif "coef" in document:
        coefs = document["coef"]
    elif document.get("coefs_file") is not None:
        coefs_file = _resolve(document["coefs_file"], base_dir)
    out = output if output is not None else document.get("output")
    if out is None:
        raise _fail("no output: set 'output' or pass -o", label)
    if output is None:
        if output_root is not None and isinstance(out, str) and out not in ("", "-"):
            # Whoever wrote the file chose this path, not the user running tvtool.
            out = str(confined_path(out, output_root, f"merge config {label}: output"))
        else:
            out = _resolve(out, base_dir)
    try:
        return MergeConfig(vectors=tuple(vectors), output=out,
                           method=document.get("method", "task_arithmetic"),
                           params=document.get("params") or {}, coefs=coefs,
                           coefs_file=coefs_file, seed=document.get("seed", 0),
                           missing=document.get("missing", "refuse"),
                           allow_base_mismatch=document.get("allow_base_mismatch", False),
                           mixed_modes_as=document.get("mixed_modes_as"),
                           vector_params=tuple(own_params), dtype=document.get("dtype"))
    except TvtoolError as exc:
        # The same checks as for flags; the message says which document failed them.
        raise _fail(exc.message, label, exc.hint) from None


def check_new_output(path: str, key: str, label: str, force: bool) -> None:
    """Refuse an output a config names that exists already, unless ``force``.

    The person running the command decides whether a file may be replaced (``--force``), not
    the file's author: a config has no ``overwrite:`` key.

    Raises:
        InvalidInputError: the path exists (a file, a directory or a symlink).
    """
    target = Path(path).expanduser()
    if not force and (target.exists() or target.is_symlink()):
        raise _fail(f"{key} {short_repr(path)} already exists", label,
                    hint="pass --force to replace it, or -o PATH to write elsewhere"
                    if key == "output" else "pass --force to replace it")


def load_config(path: str, *, output: str | None = None, force: bool = False) -> MergeConfig:
    """Read and validate a YAML (or JSON) merge config file.

    A config may come from someone else (a pull request a CI job merges), so the ``output``
    it names is confined: relative to the file's folder (the working directory for stdin),
    never absolute, never leading out of that folder (``..``, symlinks), and never an
    existing file unless ``force``. An ``output`` given by the caller is used as it is. Either
    way the output must not be the config file itself.

    Args:
        path: Config file (``-`` = stdin; relative paths then resolve against the cwd).
        output: Output path overriding the file's ``output`` (``-o``).
        force: Let the file's ``output`` replace an existing file (``--force``).

    Raises:
        InvalidInputError: unreadable file, invalid YAML, a schema violation, an ``output``
            outside the config's folder or (without ``force``) an existing one, an output
            that is the config file.
        UsageError: ``force`` without an ``output`` from the file to apply it to.

    """
    from tvtool.io import check_distinct_paths
    from tvtool.io.yaml_io import read_yaml

    if force and output is not None:
        raise UsageError("--force applies to the output a config names; -o already says "
                         "where to write (and replaces an existing file)",
                         hint="drop --force, or drop -o")
    document = read_yaml(path)
    base_dir = None if path == "-" else Path(path).expanduser().parent
    config = config_from_document(document, label=repr(path), base_dir=base_dir, output=output,
                                  output_root=base_dir if base_dir is not None else Path.cwd())
    check_distinct_paths(config.output, [path])
    if output is None and config.output != "-":
        check_new_output(config.output, "output", repr(path), force)
    return config
