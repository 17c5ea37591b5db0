"""The fine-tuning modes by name: one line per mode.

Each mode module defines a :class:`~tvtool.finetune.base.FinetuneMode` (how it adapts the
image encoder); what its *vectors* are (linearized, factored) is declared on
:class:`tvtool.metadata.Mode`.
"""

from __future__ import annotations

from tvtool.errors import UsageError
from tvtool.finetune.attn import AttnMode
from tvtool.finetune.base import FinetuneMode
from tvtool.finetune.full import FullMode
from tvtool.finetune.linear import LinearMode
from tvtool.finetune.llora import LloraMode, LloraNetMode
from tvtool.finetune.lora import LoraMode
from tvtool.metadata import Mode

MODES: dict[Mode, FinetuneMode] = {
    Mode.FULL: FullMode(),
    Mode.ATTN: AttnMode(),
    Mode.LINEAR: LinearMode(),
    Mode.LORA: LoraMode(),
    Mode.LLORA: LloraMode(),
    Mode.LLORA_NET: LloraNetMode(),
}
"""The fine-tuning modes by name."""


def get_mode(name: str | Mode) -> FinetuneMode:
    """Look up a fine-tuning mode.

    Raises:
        UsageError: unknown name.
    """
    try:
        return MODES[Mode(name)]
    except ValueError:
        raise UsageError(f"unknown fine-tuning mode {name!r}",
                         hint=f"use one of {', '.join(m.value for m in MODES)}") from None
