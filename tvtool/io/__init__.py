"""The only package that reads or writes files (and stdin/stdout bytes).

Public API:

* :func:`open_tensors` -- lazy, validated reader for safetensors files or ``-`` (stdin).
* :func:`write_tensors` -- streaming, atomic safetensors writer (file or ``-`` for stdout).
* :class:`TensorSource`, :class:`TensorInfo` -- what readers return.
* :func:`check_distinct_paths` -- refuse an output that is also an input.
* :func:`atomic_output` -- context manager giving a temp path renamed into place on success.
* :func:`load_legacy` -- read pickled checkpoints without executing pickle code.
"""

from tvtool.io.atomic import atomic_output, check_distinct_paths
from tvtool.io.legacy import load_legacy
from tvtool.io.safetensors_io import (
    DictSource,
    TensorInfo,
    TensorSource,
    open_tensors,
    read_json,
    write_bytes,
    write_json,
    write_tensors,
)

__all__ = [
    "DictSource",
    "TensorInfo",
    "TensorSource",
    "atomic_output",
    "check_distinct_paths",
    "load_legacy",
    "open_tensors",
    "read_json",
    "write_bytes",
    "write_json",
    "write_tensors",
]
