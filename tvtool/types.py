"""Shared type aliases."""

from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]
"""A flat mapping from open_clip state-dict names to tensors."""
