"""The torchrun process group of a fine-tuning run."""

from __future__ import annotations

import torch.distributed as dist

from tvtool.finetune.sampling import DistInfo


def init_process_group(info: DistInfo, device_kind: str) -> bool:
    """Join the torchrun process group of a multi-process run (nccl on CUDA, else gloo).

    Returns:
        Whether this call created the group (the caller then destroys it).
    """
    if info.world <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return True
