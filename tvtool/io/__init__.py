"""The only package that reads or writes files (and stdin/stdout bytes).

Public API:

* :func:`open_tensors` -- lazy, validated reader for safetensors files or ``-`` (stdin).
* :func:`write_tensors` -- streaming, atomic safetensors writer (file or ``-`` for stdout).
* :class:`TensorSource`, :class:`TensorInfo` -- what readers return.
* :func:`check_output` -- refuse an unusable output (an input, a directory) before any work.
* :func:`check_distinct_paths` -- refuse an output that is also an input.
* :func:`atomic_output` -- context manager giving a temp path renamed into place on success.
* :func:`read_pickled_checkpoint` / :func:`read_checkpoint` / :func:`load_legacy` -- read
  pickled (or plain safetensors) checkpoints without executing pickle code;
  :func:`read_pickled_dict` -- a pickled dict of tensors and plain values, the same way.
* :func:`read_json`, :func:`write_json`, :func:`write_bytes` -- small documents (atomic;
  ``-`` for stdin/stdout); :func:`spooled_stdin`, :func:`input_file` -- plain inputs
  (:mod:`tvtool.io.documents`); :func:`all_finite` -- the writer's NaN/Inf check;
  :func:`fingerprint` -- the sha256 of a source's tensors.
* :func:`hf_model_files` -- the weights file and ``config.json`` of a Hugging Face export;
  :func:`write_open_clip_dir` -- an open_clip Hugging Face directory (weights, config, card).
* :func:`read_peft_adapter` / :func:`write_peft_adapter` / :func:`is_peft_adapter` -- peft
  adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``; a pickled
  ``adapter_model.bin`` is refused, never unpickled).
* :func:`ensure_directory`, :func:`remove_file`, :func:`scratch_directory` -- directories
  tvtool owns (cache, work, scratch) and removal of its own damaged files;
  :func:`remove_output` -- removal of an output a failing command has just written;
  :func:`confined_path` -- a path named by a file, kept inside that file's folder.
"""

from tvtool.io.atomic import (
    STDIO,
    atomic_output,
    check_distinct_paths,
    check_output,
    check_output_path,
)
from tvtool.io.documents import input_file, read_json, spooled_stdin, write_bytes, write_json
from tvtool.io.fingerprints import fingerprint
from tvtool.io.hf_dirs import (
    HfModelFiles,
    check_new_directory,
    hf_model_files,
    write_open_clip_dir,
)
from tvtool.io.legacy import (
    LegacyCheckpoint,
    load_legacy,
    read_checkpoint,
    read_pickled_checkpoint,
    read_pickled_dict,
)
from tvtool.io.paths import (
    confined_path,
    ensure_directory,
    remove_file,
    remove_output,
    scratch_directory,
)
from tvtool.io.peft_dirs import (
    PeftAdapterFiles,
    adapter_weights_path,
    is_peft_adapter,
    read_peft_adapter,
    write_peft_adapter,
)
from tvtool.io.safetensors_io import (
    DictSource,
    TensorInfo,
    TensorSource,
    all_finite,
    iter_source,
    open_tensors,
    write_tensors,
)

__all__ = [
    "STDIO",
    "DictSource",
    "HfModelFiles",
    "LegacyCheckpoint",
    "PeftAdapterFiles",
    "TensorInfo",
    "TensorSource",
    "adapter_weights_path",
    "all_finite",
    "atomic_output",
    "check_distinct_paths",
    "check_new_directory",
    "check_output",
    "check_output_path",
    "confined_path",
    "ensure_directory",
    "fingerprint",
    "hf_model_files",
    "input_file",
    "is_peft_adapter",
    "iter_source",
    "load_legacy",
    "open_tensors",
    "read_checkpoint",
    "read_json",
    "read_peft_adapter",
    "read_pickled_checkpoint",
    "read_pickled_dict",
    "remove_file",
    "remove_output",
    "scratch_directory",
    "spooled_stdin",
    "write_bytes",
    "write_json",
    "write_open_clip_dir",
    "write_peft_adapter",
    "write_tensors",
]
