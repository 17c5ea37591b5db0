"""Golden values of the formulas docs/format.md publishes, computed here from the text.

A changed hash or permutation would make every existing file unreadable (a vector would no
longer match its base; a coefficient file would scale other elements) while every round-trip
test still passed. So each value is computed from the documented formula with hashlib and
numpy, independently of tvtool, and pinned as a literal.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from tvtool.atlas.blocks import TensorSpec, build_partition, random_groups
from tvtool.models import state_dict_fingerprint

# One tensor of each kind the formula distinguishes: float32 (with -0.0), a 0-d tensor,
# float16, an empty tensor, an integer tensor; given out of name order.
TENSORS = {
    "visual.proj": np.array([[1.5, -2.0, 0.25], [3.0, -0.0, 1e-3]], dtype="<f4"),
    "logit_scale": np.array(4.6052, dtype="<f4"),
    "visual.ln.weight": np.array([1.0, 0.5, -0.125], dtype="<f2"),
    "text.empty": np.zeros((0, 3), dtype="<f4"),
    "text.ids": np.array([3, -1], dtype="<i8"),
}
TORCH_DTYPE = {"<f4": "torch.float32", "<f2": "torch.float16", "<i8": "torch.int64"}
GOLDEN_FINGERPRINT = "sha256:627494d994212261eb10968f533194fd8ef4e91a9db98bf6a398cebfaa66f58a"


def _documented_fingerprint(arrays: dict[str, np.ndarray]) -> str:
    # docs/format.md, "Base fingerprint": sorted names; per tensor the line
    # "{name}|{dtype}|{shape}\n" then the raw little-endian bytes.
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        shape = "(" + "".join(f"{s}, " for s in array.shape).removesuffix(", ") + \
            ("," if array.ndim == 1 else "") + ")"
        digest.update(f"{name}|{TORCH_DTYPE[array.dtype.str]}|{shape}\n".encode())
        digest.update(array.tobytes(order="C"))
    return "sha256:" + digest.hexdigest()


def test_base_fingerprint_golden_value():
    assert _documented_fingerprint(TENSORS) == GOLDEN_FINGERPRINT
    tensors = {name: torch.from_numpy(array.copy()) for name, array in TENSORS.items()}
    assert state_dict_fingerprint(tensors) == GOLDEN_FINGERPRINT
    # Storage order does not matter; one flipped bit does.
    reordered = dict(reversed(list(tensors.items())))
    assert state_dict_fingerprint(reordered) == GOLDEN_FINGERPRINT
    tensors["visual.proj"][1, 1] = 0.0  # -0.0 -> +0.0: equal values, other bytes
    assert state_dict_fingerprint(tensors) != GOLDEN_FINGERPRINT


def _documented_seed(name: str, numel: int, seed: int) -> int:
    digest = hashlib.sha256(f"tvtool-atlas\x1f{seed}\x1f{name}\x1f{numel}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# (name, n, K, --partition-seed) -> (generator seed, order): the documented formula's values.
GOLDEN_ORDERS = {
    ("visual.proj", 10, 3, 0): (1718437251378080431, [9, 3, 0, 2, 1, 8, 5, 4, 7, 6]),
    ("visual.transformer.resblocks.0.attn.in_proj_weight", 12, 4, 7):
        (8205253652837016724, [0, 10, 7, 9, 4, 2, 1, 8, 5, 6, 3, 11]),
}


def test_random_partition_golden_values():
    for (name, numel, k, seed), (generator_seed, order) in GOLDEN_ORDERS.items():
        assert _documented_seed(name, numel, seed) == generator_seed
        documented = torch.randperm(numel, generator=torch.Generator().manual_seed(
            generator_seed)).tolist()
        assert documented == order
        assert random_groups(name, numel, k, seed).tolist() == order


def test_random_partition_assigns_the_documented_groups():
    # docs/format.md: tensor i owns columns i*K ... i*K+K-1; element e is in group g when e is
    # in order[floor(g*n/K) : floor((g+1)*n/K)].
    name, numel, k, seed = "visual.proj", 10, 3, 0
    order = GOLDEN_ORDERS[(name, numel, k, seed)][1]
    specs = [TensorSpec("visual.class_embedding", (4,)), TensorSpec(name, (2, 5))]
    partition = build_partition(specs, f"random:{k}", seed=seed)
    expected = [0] * numel
    for group in range(k):
        for element in order[group * numel // k:(group + 1) * numel // k]:
            expected[element] = 1 * k + group  # visual.proj is tensor 1
    assert partition.element_blocks(name).reshape(-1).tolist() == expected
    assert expected == [3, 4, 4, 3, 5, 5, 5, 5, 4, 3]
