"""``peft.utils.merge_utils`` without importing the rest of peft.

tvtool reuses peft's TIES/DARE building blocks (sign election, disjoint merge, weight
reshaping). ``import peft.utils.merge_utils`` runs ``peft/__init__``, which imports
transformers: about 10 s on the development machines, paid by every ``tvtool merge``. The
module itself needs only torch, so it is loaded from peft's installed file directly; when peft
is already imported (e.g. by LoRA code in the same process) that module is reused.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "peft.utils.merge_utils"


def _load() -> ModuleType:
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.find_spec("peft")  # locates the package without executing it
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    path = origin.parent / "utils" / "merge_utils.py" if origin is not None else None
    if path is None or not path.is_file():
        return importlib.import_module(_NAME)
    file_spec = importlib.util.spec_from_file_location("tvtool.merge._peft_merge_utils", path)
    if file_spec is None or file_spec.loader is None:
        return importlib.import_module(_NAME)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


merge_utils = _load()
calculate_majority_sign_mask = merge_utils.calculate_majority_sign_mask
disjoint_merge = merge_utils.disjoint_merge
reshape_weight_task_tensors = merge_utils.reshape_weight_task_tensors

__all__ = ["calculate_majority_sign_mask", "disjoint_merge", "merge_utils",
           "reshape_weight_task_tensors"]
