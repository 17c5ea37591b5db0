"""What every fine-tuning mode provides: an :class:`Adapter` around the image encoder.

A mode decides which tensors train, how the forward pass runs (plain, linearized, LoRA) and
how the trained state becomes a task vector. The trainer only sees the adapter: it optimises
:meth:`Adapter.trainable`, calls the adapter on images, and at the end asks for
:meth:`Adapter.task_vector`.

A task vector holds parameters only, so nothing else in the encoder may change while it
trains: in every mode, normalisation layers with running statistics (BatchNorm, e.g. in
ResNet and MobileCLIP towers) run in eval mode, normalising with the base model's frozen
statistics (see :meth:`Adapter.train`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from tvtool.errors import InvalidInputError
from tvtool.metadata import Mode
from tvtool.types import StateDict

ENCODER_PREFIX = "visual."
"""State-dict prefix of the image encoder inside an open_clip CLIP model."""

LORA_TARGET_KINDS = ("q", "k", "v", "o", "mlp")
"""LoRA targets by projection, in canonical order (``attn`` is an alias of ``q,k,v,o``)."""


@dataclass(frozen=True)
class NoOptions:
    """The options of a mode that has none (full, attn, linear)."""


@dataclass(frozen=True)
class CliOption:
    """A command-line flag that fills one field of a mode's options dataclass.

    The CLI builds the flag from this and the field: its type and default are the field's
    default value's (a tuple default becomes a comma-separated string), so each is written
    once, on the options dataclass.

    Attributes:
        field: Field of the options dataclass the flag sets (also its resume-key name).
        flag: The flag, e.g. ``--lora-rank``.
        help: Help text of the flag.
        metavar: Shown in ``--help`` instead of the type (the choices); None = the type.
        panel: Group of the flag in ``--help``.
    """

    field: str
    flag: str
    help: str
    metavar: str | None = None
    panel: str | None = None


class Adapter(nn.Module):
    """A frozen image encoder plus the tensors one fine-tuning mode trains.

    Subclasses set :attr:`mode` (which declares ``linearized``), register their trainable tensors as
    parameters that require grad, and implement the abstract methods.

    Attributes:
        encoder: The image encoder (``model.visual``); names below are relative to it.
        prefix: Prefix turning encoder names into model state-dict names.
    """

    mode: ClassVar[Mode]

    @property
    def linearized(self) -> bool:
        """Whether the trained vector is a change of the linearized model (the mode says)."""
        return self.mode.linearized

    def __init__(self, encoder: nn.Module, prefix: str = ENCODER_PREFIX) -> None:
        super().__init__()
        self.encoder = encoder
        self.prefix = prefix

    def train(self, mode: bool = True) -> Adapter:
        """Set train mode, except that BatchNorm-style layers keep their statistics frozen.

        In train mode BatchNorm would normalise with batch statistics and update its running
        mean and variance, buffers a task vector does not carry: the stored vector (and
        ``--checkpoint-out``, base + deltas) would not be the trained network. With frozen
        statistics training and evaluation compute the same function, and the running
        statistics stay exactly the base model's.
        """
        super().train(mode)
        freeze_norm_statistics(self)
        return self

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable tensors by stable name, in a fixed order (optimizer and checkpoint use it)."""
        raise NotImplementedError

    def decay_anchors(self) -> dict[str, Tensor]:
        """Offsets from fixed weights: name -> θ0, for parameters that store θ − θ0.

        AdamW's decoupled weight decay shrinks the weights θ (as in the reference code), so
        for a parameter holding δ = θ − θ0 the trainer decays toward −θ0 instead of 0.
        """
        return {}

    def task_vector(self) -> StateDict:
        """Trained result as stored in the task-vector file (CPU tensors, model names)."""
        raise NotImplementedError

    def dense_delta(self) -> StateDict:
        """Dense weight change θ − θ0 by model name (equal to :meth:`task_vector` but for LoRA)."""
        return self.task_vector()

    def vector_metadata(self) -> dict[str, str]:
        """Extra ``tvtool.*`` metadata keys (without prefix) for the task-vector file."""
        return {}

    def trainable_state(self) -> StateDict:
        """Detached CPU copy of the trainable tensors (for checkpoints)."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.trainable()}

    def load_trainable_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore trainable tensors saved by :meth:`trainable_state`.

        Raises:
            InvalidInputError: names or shapes do not match this adapter.
        """
        own = dict(self.trainable())
        if set(own) != set(state):
            missing = sorted(set(own) - set(state))[:3]
            extra = sorted(set(state) - set(own))[:3]
            raise InvalidInputError(
                f"checkpoint does not fit this run: missing {missing}, unexpected {extra}",
                hint="resume with the same --mode and LoRA settings, or start a new --workdir")
        with torch.no_grad():
            for name, param in own.items():
                tensor = state[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise InvalidInputError(f"checkpoint tensor {name!r} has shape "
                                            f"{tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.copy_(tensor)


class FinetuneMode(Protocol):
    """A fine-tuning mode: a name, its options, and how to build its adapter.

    Attributes:
        name: The :class:`~tvtool.metadata.Mode` it trains (which declares ``linearized``
            and ``factored``).
        summary: One line for logs.
        label: Another name of the mode, shown after its own in the ``--mode`` help
            (``llora (L-LoRA)``); empty for none.
        options: Frozen dataclass of the mode's own settings (every field has a default;
            ``__post_init__`` validates, raising UsageError); :class:`NoOptions` if none.
        cli_options: The flags that fill ``options`` fields (``tvtool finetune`` adds them).
        run_marks: Entries its training states record beyond the settings, so that a state
            of another model that once went by the same mode name does not resume.
    """

    name: Mode
    summary: str
    label: ClassVar[str]
    options: ClassVar[type]
    cli_options: ClassVar[tuple[CliOption, ...]]
    run_marks: ClassVar[Mapping[str, str]]

    @property
    def linearized(self) -> bool:
        """Whether its vectors are linearized (declared on :class:`~tvtool.metadata.Mode`)."""
        ...

    def make_options(self, values: Mapping[str, Any]) -> Any:
        """Build (and so validate) this mode's options from values by field name."""
        ...

    def check_encoder(self, encoder: nn.Module, options: Any) -> None:
        """Refuse an encoder whose structure this mode cannot train (works on meta tensors)."""
        ...

    def build(self, encoder: nn.Module, options: Any, *, seed: int = 0) -> Adapter:
        """Wrap ``encoder`` (frozen where the mode says so) for training.

        Args:
            encoder: The image encoder.
            options: An instance of :attr:`options`.
            seed: Seed of any random initialisation (LoRA factors).
        """
        ...


class ModeBase:
    """Base of the mode objects: ``linearized`` comes from the :class:`Mode` they name.

    Modes without options of their own keep the defaults :class:`NoOptions` and no flags.
    """

    name: Mode
    label: ClassVar[str] = ""
    options: ClassVar[type] = NoOptions
    cli_options: ClassVar[tuple[CliOption, ...]] = ()
    run_marks: ClassVar[Mapping[str, str]] = {}

    @property
    def linearized(self) -> bool:
        """Whether its vectors are linearized (declared on :class:`~tvtool.metadata.Mode`)."""
        return self.name.linearized

    def make_options(self, values: Mapping[str, Any]) -> Any:
        """Build this mode's options from ``values`` by field name.

        Values for fields the mode does not have are ignored: ``tvtool finetune`` passes
        every mode's flags, and a flag of another mode has no effect (as LoRA flags never had
        on ``--mode full``).

        Raises:
            UsageError: a value the options dataclass refuses.
        """
        own = {f.name for f in fields(self.options)}
        return self.options(**{k: v for k, v in values.items() if k in own})

    def check_encoder(self, encoder: nn.Module, options: Any) -> None:
        """Refuse an encoder whose structure this mode cannot train; any encoder by default.

        Raises:
            InvalidInputError: the encoder lacks what the mode trains.
        """
        return None


def freeze(module: nn.Module) -> None:
    """Stop gradients to every parameter of ``module``."""
    for param in module.parameters():
        param.requires_grad_(False)


def running_statistics_modules(module: nn.Module) -> list[nn.Module]:
    """Submodules that update running statistics in train mode (BatchNorm, InstanceNorm).

    Found by type: every subclass of torch's normalisation base with running statistics
    (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm's ``BatchNormAct2d``, ...).
    """
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def freeze_norm_statistics(module: nn.Module) -> None:
    """Put every layer with running statistics into eval mode (normalise with frozen stats).

    Their affine weights still train; only the running mean/variance stop updating and the
    batch statistics are not used. Call after ``module.train()``, which resets them.
    """
    for norm in running_statistics_modules(module):
        norm.eval()


def _block_names(encoder: nn.Module, containers: tuple[type[nn.Module], ...]) -> set[str]:
    """Names of the elements of every container module of ``encoder`` (its blocks)."""
    names: set[str] = set()
    for name, module in encoder.named_modules():
        if isinstance(module, containers):
            names.update(f"{name}.{child}" if name else child
                         for child, _ in module.named_children())
    return names


def _multihead_attention(encoder: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    found = [(name, module) for name, module in encoder.named_modules()
             if isinstance(module, nn.MultiheadAttention)]
    block_names = _block_names(encoder, (nn.ModuleList,))
    in_blocks = [(name, module) for name, module in found
                 if name.rpartition(".")[0] in block_names]
    return in_blocks or found


def projection_attention_parameters(module: nn.Module) -> list[str] | None:
    """Parameter names of a timm-style attention module's projections, else ``None``.

    timm's attention modules (ViT ``Attention``, EVA ``EvaAttention``, FastViT ``Attention``
    in MobileCLIP, Swin ``WindowAttention``) hold their projections as ``nn.Linear`` children:
    a fused ``qkv`` or separate ``q_proj``/``k_proj``/``v_proj``, and the output ``proj``. The
    returned names are those layers' parameters plus parameters the module holds directly
    (EVA's ``q_bias``/``v_bias`` beside a bias-free ``qkv``); normalisation layers inside the
    module (``q_norm``, ``k_norm``, ``norm``) are not attention projections and are left out.
    """
    children = dict(module.named_children())
    if not isinstance(children.get("proj"), nn.Linear):
        return None
    if isinstance(children.get("qkv"), nn.Linear):
        inputs = ["qkv"]
    elif all(isinstance(children.get(n), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
        inputs = ["q_proj", "k_proj", "v_proj"]
    else:
        return None
    names = [f"{child}.{n}" for child in (*inputs, "proj")
             for n, _ in children[child].named_parameters()]
    return names + [n for n, _ in module.named_parameters(recurse=False)]


def attention_projections(encoder: nn.Module) -> list[tuple[str, list[str]]]:
    """The attention modules of the encoder's blocks and their trainable parameter names.

    Two kinds are recognised by type and structure, never by the encoder's class:

    * ``nn.MultiheadAttention`` (open_clip's own ViTs): all its parameters (in- and
      out-projection weights and biases). Blocks are the elements of the encoder's
      ``nn.ModuleList`` s; encoders with such attention but no such list fall back to every
      ``nn.MultiheadAttention``.
    * timm-style attention (:func:`projection_attention_parameters`) whose parent is an
      element of an ``nn.ModuleList`` or ``nn.Sequential`` (timm's ``blocks``/``stages``).

    Attention outside the blocks (an attentional pooler) is not a block's and is left out.

    Returns:
        ``(module name, parameter names relative to the module)`` in module order; frozen
        parameters (``requires_grad=False``) are left out.

    Raises:
        InvalidInputError: the encoder has no attention blocks of either kind (e.g. a ResNet
            or ConvNeXt tower).
    """
    mha = {name for name, _ in _multihead_attention(encoder)}
    blocks = _block_names(encoder, (nn.ModuleList, nn.Sequential))
    found: list[tuple[str, list[str]]] = []
    for name, module in encoder.named_modules():
        if name in mha:
            names = [n for n, _ in module.named_parameters()]
        elif not isinstance(module, nn.MultiheadAttention) and \
                name.rpartition(".")[0] in blocks:
            names = projection_attention_parameters(module) or []
        else:
            continue
        params = dict(module.named_parameters())
        trainable = [n for n in names if params[n].requires_grad]
        if trainable:
            found.append((name, trainable))
    if not found:
        raise InvalidInputError(
            f"the image encoder ({type(encoder).__name__}) has no attention blocks: attn mode "
            "trains nn.MultiheadAttention modules (open_clip ViTs) or timm attention modules "
            "(qkv or q_proj/k_proj/v_proj, and proj) inside the encoder's blocks",
            hint="use --mode full or --mode linear for ResNet and ConvNeXt towers")
    return found


def attention_modules(encoder: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    """The ``nn.MultiheadAttention`` modules of the encoder's blocks (what LoRA targets).

    Blocks are the elements of the encoder's ``nn.ModuleList`` s (``transformer.resblocks`` in
    open_clip); an attention module outside them (an attentional pooler) is not a block's.
    Encoders with attention but no such list fall back to every attention module.

    Raises:
        InvalidInputError: the encoder has no ``nn.MultiheadAttention``: a ResNet, or a timm
            tower (whose attention, if any, is timm's own module, which the LoRA modes do not
            support).
    """
    found = _multihead_attention(encoder)
    if not found:
        timm_style = any(projection_attention_parameters(m) for m in encoder.modules())
        raise InvalidInputError(
            f"the image encoder ({type(encoder).__name__}) has no nn.MultiheadAttention "
            "modules: the LoRA modes (lora, llora) support open_clip's own ViT image encoders "
            "only, not timm or ResNet towers",
            hint="use --mode attn or --mode full" if timm_style else
            "use --mode full or --mode linear")
    return found


def residual_blocks(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks holding the attention modules of :func:`attention_modules`."""
    modules = dict(encoder.named_modules())
    parents = dict.fromkeys(name.rpartition(".")[0] for name, _ in attention_modules(encoder))
    return [(name, modules[name]) for name in parents]
