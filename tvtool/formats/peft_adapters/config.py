"""``adapter_config.json``: which peft options tvtool honours or refuses, and target selection.

:func:`check_peft_config` reads the settings that decide the adapted model (rank, alpha and
their per-module patterns, rsLoRA, target and excluded modules) and refuses options that change
what the model computes in ways a task vector cannot hold; :func:`check_targets` applies peft's
rule of which modules the config selects to the weights an adapter holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tvtool.errors import InvalidInputError
from tvtool.formats.peft_adapters.patterns import BoundedPattern, MatchBudget, compile_pattern
from tvtool.limits import short_repr
from tvtool.models.modules import ModuleSpec

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


Selector = list[str] | BoundedPattern
"""Which modules a config selects: module names, or one regular expression."""


@dataclass(frozen=True)
class PeftSettings:
    """The settings of an ``adapter_config.json`` that decide the adapted model.

    Regular expressions are compiled for bounded matching (:mod:`.patterns`); ``budget``
    bounds the time all matching for this adapter may take.
    """

    rank: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: Selector | str | None
    exclude_modules: Selector | None
    layer_filter: bool
    budget: MatchBudget = field(default_factory=MatchBudget, compare=False)
    keys: dict[str, BoundedPattern] = field(default_factory=dict, compare=False)

    def rank_of(self, module: str) -> int:
        key = self._pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.rank

    def alpha_of(self, module: str) -> float:
        key = self._pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scale_of(self, module: str) -> float:
        rank, alpha = self.rank_of(module), self.alpha_of(module)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def _pattern_key(self, patterns: Mapping[str, Any], module: str) -> str | None:
        r"""Peft's rule: the first key ``P`` with ``re.match(r"(.*\.)?(P)$", module)``."""
        for key in patterns:
            compiled = self.keys[key]
            if compiled.literal is not None and "\n" not in module:
                # A plain name (the usual key): the same answer without the automaton.
                if module == key or module.endswith("." + key):
                    return key
            elif compiled.match(module, self.budget):
                return key
        return None


def _key_pattern(key: str, what: str) -> BoundedPattern:
    """A ``rank_pattern``/``alpha_pattern`` key as peft matches it (see ``_pattern_key``)."""
    own = compile_pattern(key, what)  # checks the key itself (length, constructs)
    wrapped = compile_pattern(rf"(.*\.)?({key})$", what)
    wrapped.literal = own.literal
    return wrapped


MAX_RANK = 2**31 - 1
"""Largest LoRA rank read from an adapter config (a larger one cannot match any factor, and
a 400-digit one would overflow the float division alpha / r)."""


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_RANK


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _names(value: Any, field_name: str, label: str) -> Selector | None:
    if value is None:
        return None
    if isinstance(value, str):
        return compile_pattern(value, f"{label}: {field_name}")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidInputError(f"{label}: {field_name} must be a list of module names or a "
                            "regular expression")


def check_peft_config(config: Mapping[str, Any], label: str) -> PeftSettings:
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
        saved = short_repr(list(config["modules_to_save"])[:3], 120)
        raise InvalidInputError(f"{label} also saves whole modules (modules_to_save {saved}); "
                                "tvtool reads LoRA factors only")
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
    if not _is_rank(rank):
        raise InvalidInputError(f"{label}: r must be an integer in [1, 2**31), got "
                                f"{short_repr(rank, 30)}")
    if not _is_number(alpha):
        raise InvalidInputError(f"{label}: lora_alpha must be a finite number, "
                                f"got {str(alpha)[:20]}")
    patterns: dict[str, dict[str, Any]] = {}
    keys: dict[str, BoundedPattern] = {}
    for name in ("rank_pattern", "alpha_pattern"):
        value = config.get(name) or {}
        if not isinstance(value, dict):
            raise InvalidInputError(f"{label}: {name} must be a JSON object")
        for key, item in value.items():
            good = _is_rank(item) if name == "rank_pattern" else _is_number(item)
            if not good:
                raise InvalidInputError(f"{label}: {name}[{short_repr(key, 60)}] is "
                                        f"{short_repr(item, 30)}")
            if key not in keys:
                keys[key] = _key_pattern(key, f"{label}: {name} key")
        patterns[name] = value
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise InvalidInputError(f"{label}: use_rslora must be true or false")
    targets = config.get("target_modules")
    return PeftSettings(
        rank=rank, alpha=float(alpha), rslora=use_rslora,  # type: ignore[arg-type]
        rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
        # 'all-linear' is peft's keyword, not a regex (check_targets refuses it).
        target_modules=targets if targets == "all-linear"
        else _names(targets, "target_modules", label),
        exclude_modules=_names(config.get("exclude_modules"), "exclude_modules", label),
        layer_filter=config.get("layers_to_transform") is not None,
        budget=MatchBudget(label=label), keys=keys)


def _matches(names: Selector, module: str, budget: MatchBudget) -> bool:
    """Peft's target rule: a regex matches the whole name, a list entry ends it after a dot."""
    if isinstance(names, BoundedPattern):
        return names.fullmatch(module, budget)
    return any(module == n or module.endswith("." + n) for n in names)


def adaptable(spec: ModuleSpec) -> bool:
    """Whether peft can adapt the module: an attention, or a Linear outside an attention."""
    return spec.kind == "mha" or (spec.kind == "linear" and not spec.inside_attention)


def check_targets(settings: PeftSettings, adapted: list[str], modules: Mapping[str, ModuleSpec],
                   label: str, notes: list[str]) -> None:
    """Module names in the config must exist; the weights must be the targeted modules."""
    targets = settings.target_modules
    budget = settings.budget
    if targets is None:
        raise InvalidInputError(f"{label}: adapter_config.json names no target_modules")
    if isinstance(targets, str):
        raise InvalidInputError(f"{label}: target_modules 'all-linear' is resolved by peft for "
                                "transformers models only")
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(_matches([t], m, budget) for m in modules)]
        if unknown:
            raise InvalidInputError(f"{label}: target_modules names modules the model does not "
                                    f"have: {short_repr(unknown[:3], 120)}",
                                    hint="is the adapter for another model, or for the image "
                                         "tower alone (--module visual) or the whole model "
                                         "(--module clip)?")
    elif not any(_matches(targets, m, budget) for m in modules):
        raise InvalidInputError(f"{label}: target_modules {short_repr(targets.pattern, 60)} "
                                "matches no module of the model",
                                hint="is it for --module visual or --module clip?")
    excluded = settings.exclude_modules
    chosen = targets

    def selected(module: str) -> bool:
        return _matches(chosen, module, budget) and not (
            excluded and _matches(excluded, module, budget))

    stray = [m for m in adapted if not selected(m)]
    if stray:
        raise InvalidInputError(f"{label}: the weights adapt {short_repr(stray[0], 80)}, "
                                "which adapter_config.json's target_modules does not select")
    if settings.layer_filter:
        notes.append("layers_to_transform is set: not checking that every targeted module "
                     "has weights")
        return
    wanted = [m for m, spec in modules.items() if adaptable(spec) and selected(m)]
    missing = [m for m in wanted if m not in adapted]
    if missing:
        raise InvalidInputError(f"{label}: adapter_model.safetensors lacks the LoRA weights of "
                                f"{len(missing)} targeted modules (e.g. {missing[0]!r})")
