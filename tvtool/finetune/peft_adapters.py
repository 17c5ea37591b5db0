"""LoRA task vectors <-> peft LoRA adapters of an open_clip model (pure functions on tensors).

peft names adapter weights by module: ``base_model.model.<module>.lora_A.weight`` [r, in] and
``.lora_B.weight`` [out, r], with ΔW = scaling·B·A, scaling = lora_alpha / r (or
lora_alpha / √r with ``use_rslora``), r and lora_alpha per module from ``rank_pattern`` /
``alpha_pattern`` where those match. For an ``nn.MultiheadAttention`` (open_clip's attention)
peft adapts the whole fused in-projection ``in_proj_weight`` [3E, E] with one pair
(``<attn>.lora_A.weight``, ``<attn>.lora_B.weight``) and the out-projection with a second
pair of the same rank (``<attn>.base_layer.out_proj.lora_A.weight`` ...); it cannot give the
q, k and v row blocks their own factors.

tvtool stores one pair per q/k/v row block (see :mod:`tvtool.finetune.lora`). The exact
correspondence used here: the row blocks present become one in-projection pair of rank
Σ r_b, A = [A_q; A_v] (stacked rows) and B block-diagonal (B_q in the q rows and the first
r_q columns, B_v in the v rows and the next columns, zeros elsewhere), so B·A =
[B_q·A_q; 0; B_v·A_v]. Pairs of a smaller rank are padded with zero rows of A and zero
columns of B (B·A is unchanged), so every module of the adapter has one rank r and one
lora_alpha = s·r for the vector's scale s = alpha/r: the adapter needs neither
``rank_pattern`` nor ``alpha_pattern``, which older peft versions match differently.

peft's wrapper of ``nn.MultiheadAttention`` applies the out-projection's delta **twice**: its
``merge()`` adds ΔW to ``out_proj``'s weight and then calls the inner layer's ``merge()``,
which adds it again; every forward pass merges that way (measured with peft 0.21.2; the
open fix huggingface/peft PR #3774 describes the same bug). A peft model with out-projection
factors (A, B) therefore computes W + 2·scaling·B·A. tvtool reproduces what peft computes:
export halves the out-projection's B, import doubles it (exact: powers of two).
:data:`MHA_OUT_PROJ_APPLIED` is that factor.

Nothing here reads files or imports peft or open_clip; module structure comes from
:func:`tvtool.models.modules.module_table`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tvtool.errors import InvalidInputError
from tvtool.finetune.lora import (
    FUSED_IN_PROJ,
    ROW_BLOCKS,
    SUFFIX_A,
    SUFFIX_B,
    split_target,
)
from tvtool.models.modules import ROOT_PREFIX, ModuleSpec

PEFT_PREFIX = "base_model.model."
"""The prefix peft gives every key of a saved adapter."""
PEFT_A = ".lora_A.weight"
PEFT_B = ".lora_B.weight"
MHA_OUT = ".base_layer.out_proj"
"""Where peft's wrapper of an ``nn.MultiheadAttention`` keeps the adapted out-projection."""
MHA_OUT_PROJ_APPLIED = 2.0
"""How many times peft applies an attention's out-projection delta (see the module docs)."""
_OUT_WEIGHT = ".out_proj.weight"
_IN_WEIGHT = "." + FUSED_IN_PROJ

# adapter_config.json keys tvtool understands or that cannot change the adapted model.
_HARMLESS = frozenset({
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
    "exclude_modules", "bias", "fan_in_fan_out", "init_lora_weights", "inference_mode",
    "base_model_name_or_path", "revision", "auto_mapping", "peft_version", "rank_pattern",
    "alpha_pattern", "use_rslora", "layers_to_transform", "layers_pattern", "eva_config",
    "corda_config", "loftq_config", "lora_ga_config", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "modules_to_save",
})
# Options that change what the adapted model computes, refused when set (truthy).
_REFUSED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_alora": "aLoRA (use_alora)",
    "target_parameters": "LoRA on nn.Parameter (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "megatron_config": "Megatron layers (megatron_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
# Initialisations that rewrite the base weights: the adapter is relative to another base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class PeftAdapter:
    """A peft adapter in memory: ``adapter_config.json`` and the saved state dict."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImportedVector:
    """A peft adapter as tvtool task-vector tensors.

    Attributes:
        tensors: LoRA factors (``T.lora_A``/``T.lora_B``) or, when the adapter's scales cannot
            be written as one tvtool alpha, dense deltas; full open_clip state-dict names.
        lora: The ``lora_alpha``/``lora_rank``/``lora_targets`` metadata of a factor vector,
            None for a dense one.
        notes: What was read and decided, for stderr.
    """

    tensors: dict[str, Tensor]
    lora: dict[str, str] | None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- export


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else float(value)


def _pad(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rows of A and zero columns of B up to ``rank`` (B·A unchanged)."""
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    return (torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0),
            torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1))


def _check_pair(target: str, a: Tensor, b: Tensor, shape: tuple[int, int] | None,
                label: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise InvalidInputError(f"{label}: LoRA factors of {target!r} do not fit: A "
                                f"{tuple(a.shape)}, B {tuple(b.shape)}")
    if shape is not None and (b.shape[0], a.shape[1]) != shape:
        raise InvalidInputError(f"{label}: LoRA factors of {target!r} give a "
                                f"{b.shape[0]}x{a.shape[1]} delta, the weight is "
                                f"{shape[0]}x{shape[1]}")


def lora_vector_to_peft(tensors: Mapping[str, Tensor], alpha: float,
                        modules: Mapping[str, ModuleSpec], root: str, *, label: str,
                        auto_mapping: Mapping[str, str] | None = None) -> PeftAdapter:
    """The peft adapter (config and state dict) of a tvtool LoRA vector.

    Args:
        tensors: The vector's tensors (``T.lora_A``/``T.lora_B`` factors only).
        alpha: Its ``tvtool.lora_alpha``; pair ``T`` changes its weight by
            (alpha/r_T)·B·A.
        modules: The module table of the model the adapter is for (names relative to
            ``root``), from :func:`tvtool.models.modules.module_table`.
        root: ``clip`` or ``visual`` (see :data:`tvtool.models.modules.ROOT_PREFIX`).
        label: How to name the vector in errors.
        auto_mapping: peft's ``auto_mapping`` entry (the base model's class) to record.

    Returns:
        The config (``adapter_config.json`` as a dict) and the state dict with peft's names.

    Raises:
        InvalidInputError: dense tensors, unpaired factors, a target peft cannot adapt (an
            attention with separate q/k/v weights) or outside ``root``, shapes that do not
            fit the model.
    """
    prefix = ROOT_PREFIX[root]
    dense = [k for k in tensors if not k.endswith((SUFFIX_A, SUFFIX_B))]
    if dense:
        raise InvalidInputError(f"{label} holds dense tensors besides its LoRA factors (e.g. "
                                f"{dense[0]!r}); a peft LoRA adapter holds factors only")
    in_parts: dict[str, dict[int | None, tuple[Tensor, Tensor]]] = {}
    out_parts: dict[str, tuple[Tensor, Tensor]] = {}
    linear_parts: dict[str, tuple[Tensor, Tensor]] = {}
    scales: dict[str, float] = {}
    for key in tensors:
        if key.endswith(SUFFIX_B):
            if key[: -len(SUFFIX_B)] + SUFFIX_A not in tensors:
                raise InvalidInputError(f"{label}: LoRA factor {key!r} has no matching "
                                        f"{SUFFIX_A}")
            continue
        target = key[: -len(SUFFIX_A)]
        if target + SUFFIX_B not in tensors:
            raise InvalidInputError(f"{label}: LoRA factor {key!r} has no matching {SUFFIX_B}")
        a, b = tensors[key], tensors[target + SUFFIX_B]
        weight, block = split_target(target)
        if not weight.startswith(prefix):
            raise InvalidInputError(f"{label} adapts {weight!r}, outside the image tower",
                                    hint="export it for the whole model (--module clip)")
        rel = weight[len(prefix):]
        if rel.endswith(_IN_WEIGHT) and modules.get(rel[: -len(_IN_WEIGHT)],
                                                    _NONE).kind == "mha":
            module = rel[: -len(_IN_WEIGHT)]
            spec = modules[module]
            shape = spec.weight_shape
            if block is not None and shape is not None:
                shape = (shape[0] // len(ROW_BLOCKS), shape[1])
            _check_pair(target, a, b, shape, label)
            if not spec.fused_in_proj:
                raise InvalidInputError(f"{label}: {module!r} has separate q/k/v weights, "
                                        "which peft cannot adapt")
            parts = in_parts.setdefault(module, {})
            if (block is None and parts) or None in parts:
                raise InvalidInputError(f"{label}: {weight!r} has LoRA factors both for the "
                                        "whole matrix and for its q/k/v rows")
            parts[block] = (a, b)
        elif rel.endswith(_OUT_WEIGHT) and modules.get(rel[: -len(_OUT_WEIGHT)],
                                                       _NONE).kind == "mha":
            module = rel[: -len(_OUT_WEIGHT)]
            _check_pair(target, a, b, modules[module].out_proj_shape, label)
            out_parts[module] = (a, b)
        elif rel.endswith(".weight") and modules.get(rel[: -len(".weight")],
                                                     _NONE).kind == "linear" \
                and not modules[rel[: -len(".weight")]].inside_attention:
            module = rel[: -len(".weight")]
            _check_pair(target, a, b, modules[module].weight_shape, label)
            linear_parts[module] = (a, b)
        else:
            raise InvalidInputError(f"{label}: no peft LoRA layer adapts {target!r} (peft "
                                    "adapts nn.MultiheadAttention and nn.Linear modules)")
        scales[target] = alpha / int(a.shape[0])

    if not scales:
        raise InvalidInputError(f"{label} holds no LoRA factors")
    notes: list[str] = []
    scale = next(iter(scales.values()))
    folded = sorted(t for t, s in scales.items() if s != scale)
    if folded:
        notes.append(f"{len(folded)} factor pairs have another scale alpha/r than the first; "
                     "their scale ratio is folded into B (rounding only)")

    def scaled(target: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        ratio = scales[target] / scale
        return (a, b) if ratio == 1.0 else (a, (b.double() * ratio).to(b.dtype))

    # One pair per peft module: (A, B) before padding to the common rank.
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    attention = sorted(set(in_parts) | set(out_parts), key=list(modules).index)
    for module in attention:
        spec = modules[module]
        assert spec.weight_shape is not None and spec.out_proj_shape is not None
        rows, cols = spec.weight_shape
        in_pair: tuple[Tensor, Tensor] | None = None
        parts = in_parts.get(module, {})
        if None in parts:
            in_pair = scaled(prefix + module + _IN_WEIGHT, *parts[None])
        elif parts:
            height = rows // len(ROW_BLOCKS)
            blocks = [(i, *scaled(f"{prefix}{module}{_IN_WEIGHT}.{ROW_BLOCKS[i]}", *parts[i]))
                      for i in range(len(ROW_BLOCKS)) if i in parts]
            rank = sum(int(a.shape[0]) for _, a, _ in blocks)
            first_a = blocks[0][1]
            big_a = torch.cat([a for _, a, _ in blocks], dim=0)
            big_b = first_a.new_zeros(rows, rank)
            column = 0
            for index, a, b in blocks:
                big_b[index * height:(index + 1) * height, column:column + a.shape[0]] = b
                column += a.shape[0]
            in_pair = (big_a, big_b)
        out_pair = None
        if module in out_parts:
            out_a, out_b = scaled(prefix + module + _OUT_WEIGHT, *out_parts[module])
            out_pair = (out_a, out_b / MHA_OUT_PROJ_APPLIED)
        some = (in_pair or out_pair)
        assert some is not None
        rank = max(int(p[0].shape[0]) for p in (in_pair, out_pair) if p is not None)
        zeros_a = some[0].new_zeros(rank, cols)
        pairs[module] = in_pair or (zeros_a, some[0].new_zeros(rows, rank))
        pairs[module + MHA_OUT] = out_pair or (zeros_a.clone(),
                                               some[0].new_zeros(spec.out_proj_shape[0], rank))
        if in_pair is None or out_pair is None:
            notes.append(f"{module}: peft adapts the in- and out-projection of an attention "
                         "together; the one without factors gets zero factors")
    if out_parts:
        notes.append("attention out-projections: B halved, since peft applies their delta "
                     "twice (huggingface/peft PR #3774)")
    for module, (a, b) in linear_parts.items():
        pairs[module] = scaled(prefix + module + ".weight", a, b)
    rank = max(int(a.shape[0]) for a, _ in pairs.values())
    peft_alpha = scale * rank
    state: dict[str, Tensor] = {}
    for module, (a, b) in pairs.items():
        a, b = _pad(a, b, rank)
        state[PEFT_PREFIX + module + PEFT_A] = a.contiguous()
        state[PEFT_PREFIX + module + PEFT_B] = b.contiguous()
    targets = [m for m in modules if m in in_parts or m in out_parts or m in linear_parts]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "auto_mapping": dict(auto_mapping) if auto_mapping else None,
        "r": rank,
        "lora_alpha": _number(peft_alpha),
        "lora_dropout": 0.0,
        "target_modules": targets,
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    return PeftAdapter(config, state, notes)


_NONE = ModuleSpec("other", "")


# ---------------------------------------------------------------- import


@dataclass(frozen=True)
class _Settings:
    rank: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str] | str | None
    exclude_modules: list[str] | str | None
    layer_filter: bool

    def rank_of(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.rank

    def alpha_of(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scale_of(self, module: str) -> float:
        rank, alpha = self.rank_of(module), self.alpha_of(module)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    r"""Peft's rule: the first pattern ``P`` with ``re.match(r"(.*\.)?(P)$", module)``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _names(value: Any, field_name: str, label: str) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise InvalidInputError(f"{label}: {field_name} {value[:60]!r} is not a valid "
                                        f"regular expression ({exc})") from None
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidInputError(f"{label}: {field_name} must be a list of module names or a "
                            "regular expression")


def check_peft_config(config: Mapping[str, Any], label: str) -> _Settings:
    """Validate an ``adapter_config.json`` and return what tvtool needs from it.

    Raises:
        InvalidInputError: not a LoRA adapter, a peft feature that changes the model in a
            way tvtool does not reproduce (DoRA, LoRA bias, ...), an initialisation that
            rewrote the base weights, trained biases or extra modules, malformed values.
    """
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidInputError(f"{label} is a peft {str(peft_type)[:30]} adapter; tvtool reads "
                                "LoRA adapters (peft_type LORA)")
    for key, what in _REFUSED.items():
        if config.get(key):
            raise InvalidInputError(f"{label} uses {what}, which tvtool does not support",
                                    hint="only plain LoRA adapters (W0 + scaling·B·A) become "
                                         "task vectors")
    unknown = sorted(k for k, v in config.items() if k not in _HARMLESS and k not in _REFUSED
                     and v not in (None, False, {}, [], ""))
    if unknown:
        raise InvalidInputError(f"{label} sets the peft option {unknown[0]!r}, unknown to "
                                "tvtool; it cannot tell whether it changes the model")
    if config.get("modules_to_save"):
        raise InvalidInputError(f"{label} also saves whole modules (modules_to_save "
                                f"{list(config['modules_to_save'])[:3]}); tvtool reads LoRA "
                                "factors only")
    if config.get("bias", "none") != "none":
        raise InvalidInputError(f"{label} trains biases (bias={str(config['bias'])[:20]!r}); "
                                "tvtool reads adapters with bias 'none'")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise InvalidInputError(
            f"{label} was initialised with {init[:30]!r}, which rewrites the base weights; "
            "its factors are relative to that modified base",
            hint="convert it to a plain LoRA first (peft's save_pretrained with "
                 "path_initial_model_for_weight_conversion)")
    if config.get("loftq_config"):
        raise InvalidInputError(f"{label} has a LoftQ config (a quantised base)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidInputError(f"{label}: r must be a positive integer, got {str(rank)[:20]}")
    if not _is_number(alpha):
        raise InvalidInputError(f"{label}: lora_alpha must be a finite number, "
                                f"got {str(alpha)[:20]}")
    patterns: dict[str, dict[str, Any]] = {}
    for name in ("rank_pattern", "alpha_pattern"):
        value = config.get(name) or {}
        if not isinstance(value, dict):
            raise InvalidInputError(f"{label}: {name} must be a JSON object")
        for key, item in value.items():
            good = (isinstance(item, int) and not isinstance(item, bool) and item >= 1) \
                if name == "rank_pattern" else _is_number(item)
            if not good:
                raise InvalidInputError(f"{label}: {name}[{key[:60]!r}] is {str(item)[:20]}")
            try:
                re.compile(key)
            except re.error as exc:
                raise InvalidInputError(f"{label}: {name} key {key[:60]!r} is not a valid "
                                        f"regular expression ({exc})") from None
        patterns[name] = value
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise InvalidInputError(f"{label}: use_rslora must be true or false")
    return _Settings(
        rank=rank, alpha=float(alpha), rslora=use_rslora,  # type: ignore[arg-type]
        rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
        target_modules=_names(config.get("target_modules"), "target_modules", label),
        exclude_modules=_names(config.get("exclude_modules"), "exclude_modules", label),
        layer_filter=config.get("layers_to_transform") is not None)


def _matches(names: list[str] | str, module: str) -> bool:
    """Peft's target rule: a regex matches the whole name, a list entry ends it after a dot."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == n or module.endswith("." + n) for n in names)


def _adaptable(spec: ModuleSpec) -> bool:
    return spec.kind == "mha" or (spec.kind == "linear" and not spec.inside_attention)


def _check_targets(settings: _Settings, adapted: list[str], modules: Mapping[str, ModuleSpec],
                   label: str, notes: list[str]) -> None:
    """Module names in the config must exist; the weights must be the targeted modules."""
    targets = settings.target_modules
    if targets is None:
        raise InvalidInputError(f"{label}: adapter_config.json names no target_modules")
    if targets == "all-linear":
        raise InvalidInputError(f"{label}: target_modules 'all-linear' is resolved by peft for "
                                "transformers models only")
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(_matches([t], m) for m in modules)]
        if unknown:
            raise InvalidInputError(f"{label}: target_modules names modules the model does not "
                                    f"have: {unknown[:3]}",
                                    hint="is the adapter for another model, or for the image "
                                         "tower alone (--module visual) or the whole model "
                                         "(--module clip)?")
    elif not any(_matches(targets, m) for m in modules):
        raise InvalidInputError(f"{label}: target_modules {targets[:60]!r} matches no module of "
                                "the model", hint="is it for --module visual or --module clip?")
    excluded = settings.exclude_modules

    def selected(module: str) -> bool:
        return _matches(targets, module) and not (excluded and _matches(excluded, module))

    stray = [m for m in adapted if not selected(m)]
    if stray:
        raise InvalidInputError(f"{label}: the weights adapt {stray[0]!r}, which "
                                "adapter_config.json's target_modules does not select")
    if settings.layer_filter:
        notes.append("layers_to_transform is set: not checking that every targeted module "
                     "has weights")
        return
    wanted = [m for m, spec in modules.items() if _adaptable(spec) and selected(m)]
    missing = [m for m in wanted if m not in adapted]
    if missing:
        raise InvalidInputError(f"{label}: adapter_model.safetensors lacks the LoRA weights of "
                                f"{len(missing)} targeted modules (e.g. {missing[0]!r})")


def _parse_keys(tensors: Mapping[str, Tensor], modules: Mapping[str, ModuleSpec],
                label: str) -> dict[str, dict[str, Tensor]]:
    """Group a peft state dict by adapted module: ``{module: {"A": .., "B": .., ...}}``.

    MHA modules get keys ``A``, ``B`` (in-projection) and ``outA``, ``outB``.
    """
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise InvalidInputError(f"{label}: unexpected key {key[:80]!r} (peft adapter keys "
                                    f"start with {PEFT_PREFIX!r})")
        name = key[len(PEFT_PREFIX):]
        if name.endswith((".lora_embedding_A", ".lora_embedding_B")):
            raise InvalidInputError(f"{label} adapts an embedding ({name[:80]!r}); tvtool "
                                    "reads LoRA on attention and Linear layers")
        if ".lora_magnitude_vector" in name:
            raise InvalidInputError(f"{label} is a DoRA adapter ({name[:80]!r}), which tvtool "
                                    "does not support")
        if name.endswith(".lora_B.bias"):
            raise InvalidInputError(f"{label} has a bias on lora_B ({name[:80]!r}), which "
                                    "tvtool does not support")
        if name.endswith(PEFT_A) or name.endswith(PEFT_B):
            which = "A" if name.endswith(PEFT_A) else "B"
            module = name[: -len(PEFT_A)]
        else:
            raise InvalidInputError(f"{label}: unexpected key {key[:80]!r} (not a LoRA factor; "
                                    "tvtool reads lora_A/lora_B weights only)")
        part = which
        if module.endswith(MHA_OUT) and modules.get(module[: -len(MHA_OUT)],
                                                    _NONE).kind == "mha":
            module, part = module[: -len(MHA_OUT)], "out" + which
        spec = modules.get(module)
        if spec is None:
            raise InvalidInputError(f"{label} adapts {module[:80]!r}, which is not a module of "
                                    "the model", hint="is the adapter for another model, or for "
                                    "the image tower alone (--module visual) or the whole model "
                                    "(--module clip)?")
        if spec.kind == "linear" and spec.inside_attention:
            raise InvalidInputError(f"{label} adapts {module!r} on its own: nn.MultiheadAttention "
                                    "never calls its out_proj's forward, so peft never applies "
                                    "that LoRA", hint="target the attention module instead")
        if not _adaptable(spec):
            raise InvalidInputError(f"{label} adapts {module!r}, a {spec.type_name}; tvtool "
                                    "reads LoRA on nn.MultiheadAttention and nn.Linear layers")
        if spec.kind == "mha" and not spec.fused_in_proj:
            raise InvalidInputError(f"{label} adapts {module!r}, an attention with separate "
                                    "q/k/v weights")
        grouped.setdefault(module, {})[part] = tensor
    return grouped


def _checked(module: str, part: str, parts: Mapping[str, Tensor], shape: tuple[int, int],
             rank: int, label: str) -> tuple[Tensor, Tensor]:
    name = module + (MHA_OUT if part == "out" else "")
    a_key, b_key = part + "A", part + "B"
    missing = [PEFT_PREFIX + name + (PEFT_A if k == a_key else PEFT_B)
               for k in (a_key, b_key) if k not in parts]
    if missing:
        raise InvalidInputError(f"{label} lacks {missing[0]!r}")
    a, b = parts[a_key], parts[b_key]
    for tensor, key in ((a, a_key), (b, b_key)):
        if not tensor.is_floating_point():
            raise InvalidInputError(f"{label}: {name}'s lora_{key[-1]} has dtype {tensor.dtype}")
    expected_a, expected_b = (rank, shape[1]), (shape[0], rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise InvalidInputError(
            f"{label}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the "
            f"model and r={rank} need {expected_a} and {expected_b}")
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        raise InvalidInputError(f"{label}: the LoRA weights of {name} contain NaN or Inf")
    return a, b


def _row_blocks(b: Tensor) -> list[str]:
    height = b.shape[0] // len(ROW_BLOCKS)
    return [ROW_BLOCKS[i] for i in range(len(ROW_BLOCKS))
            if bool(b[i * height:(i + 1) * height].any())]


def peft_to_lora_vector(config: Mapping[str, Any], tensors: Mapping[str, Tensor],
                        modules: Mapping[str, ModuleSpec], root: str, *,
                        label: str) -> ImportedVector:
    """A peft LoRA adapter of an open_clip model as tvtool task-vector tensors.

    Every adapted module becomes a factor pair with tvtool names: an attention's in-projection
    ``<attn>.in_proj_weight`` (one pair for the whole [3E, E] matrix, as peft trains it), its
    out-projection ``<attn>.out_proj.weight``, a Linear ``<module>.weight``; names get the
    ``visual.`` prefix when ``root`` is ``visual``. Pairs whose B (or A) is all zero change
    nothing and are left out, unless every pair is zero. Scales are honoured per module
    (``rank_pattern``, ``alpha_pattern``, ``use_rslora``): when every module has the same
    scaling s, the result keeps the factors, padded with zeros to the largest rank R, with
    tvtool alpha s·R (half-precision factors widened to float32); otherwise it holds the
    dense deltas scaling·B·A.

    Raises:
        InvalidInputError: see :func:`check_peft_config`; unexpected or missing keys, modules
            the model does not have or peft cannot adapt, shapes or ranks that do not fit,
            NaN or Inf.
    """
    settings = check_peft_config(config, label)
    notes: list[str] = []
    grouped = _parse_keys(tensors, modules, label)
    if not grouped:
        raise InvalidInputError(f"{label} holds no LoRA weights")
    _check_targets(settings, list(grouped), modules, label, notes)
    prefix = ROOT_PREFIX[root]
    pairs: dict[str, tuple[Tensor, Tensor, float]] = {}  # tvtool target -> (A, B, scale)
    doubled = False
    for module, parts in grouped.items():
        spec = modules[module]
        rank, scale = settings.rank_of(module), settings.scale_of(module)
        assert spec.weight_shape is not None
        if spec.kind == "mha":
            assert spec.out_proj_shape is not None
            a, b = _checked(module, "", parts, spec.weight_shape, rank, label)
            pairs[prefix + module + _IN_WEIGHT] = (a, b, scale)
            a, b = _checked(module, "out", parts, spec.out_proj_shape, rank, label)
            pairs[prefix + module + _OUT_WEIGHT] = (a, b * MHA_OUT_PROJ_APPLIED, scale)
            doubled = doubled or bool(b.any())
        else:
            a, b = _checked(module, "", parts, spec.weight_shape, rank, label)
            pairs[prefix + module + ".weight"] = (a, b, scale)
    if doubled:
        notes.append("attention out-projections: B doubled, since peft applies their delta "
                     "twice (huggingface/peft PR #3774)")
    if settings.rslora:
        notes.append("use_rslora: scaling lora_alpha/sqrt(r) per module")
    if config.get("fan_in_fan_out"):
        notes.append("fan_in_fan_out is ignored, as peft ignores it for nn.Linear and "
                     "nn.MultiheadAttention")
    nonzero = {t: p for t, p in pairs.items() if bool(p[0].any()) and bool(p[1].any())}
    if nonzero and len(nonzero) < len(pairs):
        notes.append(f"left out {len(pairs) - len(nonzero)} factor pairs that change nothing "
                     "(B or A all zero)")
        pairs = nonzero
    widened = False
    out: dict[str, Tensor] = {}
    # tvtool scales every pair by alpha / (its rank): one scale s for all modules becomes
    # alpha = s·R with every pair padded to the largest rank R (zeros: B·A unchanged).
    scales = {s for _, _, s in pairs.values()}
    rank = max(int(a.shape[0]) for a, _, _ in pairs.values())
    tvtool_alpha = next(iter(scales)) * rank
    exact = len(scales) == 1 and tvtool_alpha / rank == next(iter(scales))
    padded = False
    for target, (a, b, scale) in pairs.items():
        if a.dtype in (torch.float16, torch.bfloat16) or b.dtype in (torch.float16,
                                                                     torch.bfloat16):
            a, b, widened = a.float(), b.float(), True
        if a.dtype != b.dtype:
            a, b = a.double(), b.double()
        if exact:
            padded = padded or a.shape[0] != rank
            a, b = _pad(a, b, rank)
            out[target + SUFFIX_A], out[target + SUFFIX_B] = a.contiguous(), b.contiguous()
        else:
            out[target] = ((b.double() @ a.double()) * scale).to(a.dtype)
    if widened:
        notes.append("half-precision factors widened to float32")
    if not exact:
        notes.append("the modules' scales (lora_alpha/r per module) differ, so no single tvtool "
                     "lora_alpha reproduces them: writing dense deltas scaling·B·A")
        return ImportedVector(out, None, notes)
    if padded:
        notes.append(f"factor pairs of smaller rank padded with zeros to rank {rank}, so one "
                     "lora_alpha gives every module its scale")
    kinds: set[str] = set()
    for target, (_, b, _) in pairs.items():
        if target.endswith(_IN_WEIGHT):
            kinds.update(_row_blocks(b))
        elif target.endswith(_OUT_WEIGHT) and modules.get(
                target[len(prefix): -len(_OUT_WEIGHT)], _NONE).kind == "mha":
            kinds.add("o")
        else:
            kinds.add("mlp")
    lora = {"lora_alpha": repr(float(tvtool_alpha)), "lora_rank": str(rank),
            "lora_targets": ",".join(k for k in ("q", "k", "v", "o", "mlp") if k in kinds)}
    return ImportedVector(out, lora, notes)
