"""Fingerprints of tensor sources: the ``sha256:`` identities recorded in metadata and cards."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from tvtool.io.safetensors_io import DictSource, TensorSource


def fingerprint(source: TensorSource) -> str:
    """Hash the tensors (names, dtypes, shapes, bytes) one tensor at a time.

    The hash is independent of storage order, so the same weights give the same fingerprint
    whether read from a pretrained tag, a weights file or a tvtool checkpoint of equal dtypes.

    Returns:
        ``sha256:<hex>``.
    """
    digest = hashlib.sha256()
    for name in sorted(source.keys()):
        tensor = source.get(name).detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy().data)
    return "sha256:" + digest.hexdigest()


def state_dict_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """:func:`fingerprint` of tensors already in memory."""
    return fingerprint(DictSource(tensors))
