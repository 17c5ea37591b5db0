"""How many CPU threads torch's kernels run on (`--threads` of merge, compress and pretrain).

Merge and compress results do not depend on the count; pre-training's weights do (its float32
reductions split across threads add in another order), so pretrain records the count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tvtool.errors import UsageError


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run torch's CPU kernels on ``count`` threads inside the block (None: unchanged).

    A merge is a stream of memory-bound elementwise kernels on tensors of a few MB. On an
    oversubscribed machine every multi-threaded kernel waits for its slowest thread to be
    scheduled: measured on a shared 2-core host, the same merge took 0.15 s on one thread and
    2-6 s on two. Results do not depend on the thread count (no reduction order changes).
    """
    if count is None:
        yield
        return
    if count < 1:
        raise UsageError(f"--threads must be positive, got {count}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
