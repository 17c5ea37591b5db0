"""One device/precision policy for every command (tvtool.device)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tvtool import device as policy
from tvtool.errors import UsageError


def test_auto_precision_is_fp32_on_cpu():
    assert policy.resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cuda_device_supports_it(monkeypatch, supported,
                                                                        expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert policy.resolve_precision("auto", torch.device("cuda")) == expected


def test_autocast_follows_the_same_rule(monkeypatch):
    # Evaluation used to take bf16 on any CUDA device; now it asks the same rule as training.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert isinstance(policy.autocast(torch.device("cuda"), "auto"), contextlib.nullcontext)
    assert isinstance(policy.autocast(torch.device("cpu"), "fp32"), contextlib.nullcontext)
    assert isinstance(policy.autocast(torch.device("cpu"), "bf16"), torch.autocast)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_explicit_precisions_are_kept(name):
    assert policy.resolve_precision(name, torch.device("cpu")) == name


def test_unknown_precision_and_device_are_usage_errors():
    with pytest.raises(UsageError, match="unknown precision"):
        policy.check_precision("fp8")
    with pytest.raises(UsageError, match="unknown precision"):
        policy.check_precision("auto", ("fp32", "bf16", "fp16"))
    with pytest.raises(UsageError, match="unknown device"):
        policy.resolve_device("tpu")


def test_device_resolution(monkeypatch):
    assert policy.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert policy.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="no CUDA device"):
        policy.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert policy.resolve_device("auto") == torch.device("cuda")
    assert policy.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert policy.resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
