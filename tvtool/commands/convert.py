"""``tvtool convert``: a legacy (pickled or foreign) checkpoint -> a tvtool checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from tvtool.commands.common import config_args, file_inputs, opened
from tvtool.errors import InvalidInputError, UsageError
from tvtool.io import (
    STDIO,
    all_finite,
    check_output,
    hf_model_files,
    is_peft_adapter,
    read_checkpoint,
    read_pickled_dict,
    write_tensors,
)
from tvtool.limits import short_list
from tvtool.metadata import FileMeta, Kind, Mode, provenance
from tvtool.models import (
    base_source,
    fingerprint,
    hf_activation,
    hf_clip_to_open_clip,
    is_hf_clip,
    match_architecture,
    resolve_ref,
    uses_quick_gelu,
)
from tvtool.types import Logger, WriteResult
from tvtool.types import quiet as _quiet
from tvtool.vectors.streaming import IMAGE_ENCODER_PREFIX


@dataclass(frozen=True)
class ConvertConfig:
    """Configuration of ``tvtool convert``: a legacy checkpoint -> tvtool checkpoint.

    Attributes:
        input: Pickled ``.pt``/``.pth``/``.bin`` file (or safetensors without tvtool
            metadata), or ``-``.
        output: Output path or ``-``.
        architecture: open_clip model name; inferred from the tensor shapes when None.
        base: For a tangent_task_arithmetic linearized checkpoint: the model reference it was
            linearized at; the output is then a ``linear`` task vector.
        dataset: Dataset name to record in that task vector.
        module: For a peft adapter directory: the module it was trained on, ``clip`` (the
            open_clip model), ``visual`` (its image tower) or ``auto``.
    """

    input: str
    output: str
    architecture: str | None = None
    base: str | None = None
    dataset: str | None = None
    module: str = "auto"


def _activation(classes: frozenset[str]) -> bool | None:
    """Whether a pickled model used QuickGELU (None: the file does not say)."""
    if any(name.rsplit(".", 1)[-1] == "QuickGELU" for name in classes):
        return True
    if "torch.nn.modules.activation.GELU" in classes:
        return False
    return None


def convert(config: ConvertConfig, log: Logger = _quiet) -> WriteResult:
    """Convert a pickled (or plain safetensors) checkpoint into a tvtool checkpoint.

    A peft adapter directory (``adapter_config.json``) becomes a LoRA task vector instead
    (:func:`tvtool.commands.peft_interop.convert_peft`).

    Pickles are read by :func:`tvtool.io.read_checkpoint`, which never executes code
    from the file. Wrapper prefixes (``module.``, ``model.``) are removed, Hugging Face
    ``transformers`` CLIP names are mapped to open_clip's (see :mod:`tvtool.models.hf_clip`),
    and the open_clip architecture is checked (``architecture``) or inferred from the tensor
    shapes.

    Raises:
        InvalidInputError: unreadable input, no or several fitting architectures, tensors
            that do not fit the given architecture, or an output that is the input.
    """
    if is_peft_adapter(config.input):
        raise UsageError(f"{config.input} is a peft adapter directory",
                         hint="convert it with tvtool.commands.peft_interop.convert_peft "
                              "(the CLI's `tvtool convert` does)")
    if config.module != "auto":
        raise UsageError("--module is for peft adapter directories (adapter_config.json)")
    if config.base is not None:
        return _convert_linearized(config, log)
    if config.dataset is not None:
        raise UsageError("--dataset is recorded in task vectors; convert writes a checkpoint "
                         "unless --base names the base of a linearized checkpoint")
    files = hf_model_files(config.input)
    check_output(config.output, [files.weights])
    try:
        checkpoint = read_checkpoint(files.weights)
    except InvalidInputError as exc:
        if "'model.params" in exc.message:
            exc.hint = ("this looks like a tangent_task_arithmetic linearized checkpoint: pass "
                        "--base (the pre-trained model it was linearized at) to convert it "
                        "into a linear task vector")
        raise
    for note in checkpoint.notes:
        log(note)
    notes = list(checkpoint.notes)
    tensors = checkpoint.tensors
    container = checkpoint.container
    quick_gelu = _activation(checkpoint.classes)
    hf_config = None
    optional: frozenset[str] = frozenset()
    if is_hf_clip(tensors):
        mapped = hf_clip_to_open_clip(tensors)
        tensors = mapped.tensors
        container = f"Hugging Face {mapped.model_class} ({container})"
        hf_config = files.read_config()
        quick_gelu = hf_activation(hf_config) if hf_config is not None else None
        notes.append(f"mapped {len(checkpoint.tensors)} Hugging Face {mapped.model_class} "
                     f"tensors to {len(tensors)} open_clip tensors")
        notes.extend(mapped.notes)
        if mapped.model_class == "CLIPVisionModel":
            optional = frozenset({"visual.proj"})
        if hf_config is not None:
            notes.append(f"activation from {files.config_path}: "
                         f"{'quick_gelu' if quick_gelu else 'gelu'}"
                         if quick_gelu is not None else
                         f"{files.config_path} names no activation")
    try:
        match = match_architecture({n: tuple(t.shape) for n, t in tensors.items()},
                                   architecture=config.architecture, quick_gelu=quick_gelu,
                                   optional=optional)
    except InvalidInputError as exc:
        if hf_config is None and container.startswith("Hugging Face") \
                and config.architecture is None:
            exc.hint = ("pass --architecture NAME, or keep the Hugging Face config.json beside "
                        "the weights: it names the activation (quick_gelu -> NAME-quickgelu)")
        raise
    if container.startswith("Hugging Face") and quick_gelu is not None \
            and uses_quick_gelu(match.architecture) != quick_gelu:
        # The weights would load, but the MLPs would compute another function.
        want = "QuickGELU" if quick_gelu else "GELU"
        raise InvalidInputError(
            f"the Hugging Face config says the model uses {want}, but {match.architecture} "
            f"does not", hint="pass --architecture with the "
            f"{'-quickgelu variant' if quick_gelu else 'variant without -quickgelu'}")
    how = "inferred from the tensor shapes" if match.inferred else "as given"
    if match.inferred and quick_gelu is not None:
        how += f" and the {'config' if hf_config is not None else 'pickled'} activation " \
               f"({'QuickGELU' if quick_gelu else 'GELU'})"
    notes.append(f"architecture {match.architecture} ({how})")
    if match.missing:
        # extract keeps the image encoder by default: only its own gaps need --allow-missing.
        image = [name for name in match.missing if name.startswith(IMAGE_ENCODER_PREFIX)]
        how = ("extract a task vector from it with `tvtool extract --allow-missing`" if image
               else "none is in the image encoder, which `tvtool extract` keeps by default")
        notes.append(f"the checkpoint lacks {len(match.missing)} tensors of "
                     f"{match.architecture} (e.g. {list((image or match.missing)[:2])}); {how}")
    for note in notes[len(checkpoint.notes):]:
        log(note)
    bad = [n for n, t in tensors.items() if not all_finite(t)]
    if bad:
        raise InvalidInputError(f"{len(bad)} tensors of the checkpoint contain NaN or Inf, "
                                f"e.g. {short_list(bad, 3)}")
    meta = FileMeta(kind=Kind.CHECKPOINT, architecture=match.architecture,
                    provenance=provenance("convert", config_args(config)),
                    extra={"converted_from": container})
    write_tensors(config.output, tensors, meta.to_header(), inputs=[files.weights])
    return WriteResult(config.output, len(tensors),
                       sum(t.numel() for t in tensors.values()), notes,
                       details={"architecture": match.architecture,
                                "missing": len(match.missing)})


def _convert_linearized(config: ConvertConfig, log: Logger) -> WriteResult:
    """A tangent_task_arithmetic ``LinearizedImageEncoder`` save -> ``linear`` task vector."""
    from tvtool.models.tangent import (
        is_tangent_linearized,
        name_tangent_checkpoint,
        tangent_task_vector,
    )

    if config.architecture is not None:
        raise UsageError("--architecture is not used with --base: the base names it")
    if config.input == STDIO:
        raise UsageError("a linearized checkpoint is read from a file, not stdin")
    ref = resolve_ref(config.base or "")
    check_output(config.output, [config.input, *file_inputs(ref)])
    entries = read_pickled_dict(config.input)
    label = repr(config.input)
    if not is_tangent_linearized(entries):
        raise InvalidInputError(
            f"{label} is not a tangent_task_arithmetic linearized checkpoint (no "
            "model.params.N / model.params0.N entries)",
            hint="--base is only for linearized checkpoints; convert others without it")
    base, ref = base_source(ref)
    with opened([base]):
        named = name_tangent_checkpoint(entries, ref.architecture, label)
        available = set(base.keys())
        vector, notes = tangent_task_vector(
            named, {n: base.get(n) for n in named.params0 if n in available}, label)
        notes.insert(0, f"read {len(named.params)} linearized parameters of "
                        f"{named.model_name!r} (params and params0)")
        for note in notes:
            log(note)
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=ref.architecture,
                        base_ref=config.base, base_fingerprint=fingerprint(base),
                        mode=Mode.LINEAR, linearized=True, dataset=config.dataset,
                        provenance=provenance("convert", config_args(config)),
                        extra={"converted_from": "tangent_task_arithmetic LinearizedImageEncoder "
                                                 f"({named.model_name})"})
        write_tensors(config.output, vector, meta.to_header(),
                      inputs=[config.input, *file_inputs(ref)])
    return WriteResult(config.output, len(vector), sum(t.numel() for t in vector.values()),
                       notes, details={"architecture": ref.architecture, "mode": "linear"})
