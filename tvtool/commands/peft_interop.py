"""peft adapters: ``tvtool export-peft`` and the adapter branch of ``tvtool convert``.

``export-peft`` writes a LoRA vector as an adapter directory; ``convert`` reads one back.

The tensor mapping is in :mod:`tvtool.formats.peft_adapters`, the files in
:mod:`tvtool.io.peft_dirs`; neither imports peft. See docs/interop.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvtool.cards import check_license, front_matter, license_note, public_dataset
from tvtool.commands.common import config_args
from tvtool.commands.convert import ConvertConfig
from tvtool.errors import InvalidInputError, UsageError
from tvtool.formats.lora import SUFFIX_A, lora_alpha_rank, svd_factored
from tvtool.formats.peft_adapters import (
    MHA_OUT_PROJ_LOADED,
    lora_vector_to_peft,
    mha_out_proj_applied,
    peft_to_lora_vector,
)
from tvtool.io import (
    STDIO,
    adapter_weights_path,
    check_new_directory,
    check_output,
    open_tensors,
    read_peft_adapter,
    write_peft_adapter,
    write_tensors,
)
from tvtool.limits import short_repr
from tvtool.metadata import PREFIX, FileMeta, Kind, Mode, provenance
from tvtool.models import base_source, fingerprint, resolve_ref
from tvtool.models.hub import card_base
from tvtool.models.modules import module_table, root_class
from tvtool.models.refs import check_recorded_architecture
from tvtool.types import Logger, WriteResult
from tvtool.types import quiet as _quiet
from tvtool.vectors import open_vector_meta

MODULE_ROOTS = ("clip", "visual")
"""``--module`` values: the whole open_clip model, or its image tower ``model.visual``."""
_PEFT_MODULE_KEY = PREFIX + "peft_module"


def installed_peft_version() -> str | None:
    """The installed peft's version, or None when peft is not installed.

    Read from its distribution metadata: importing peft is not needed.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:
        return None


def _out_proj_factor(recorded: dict[str, str], adapter_config: dict[str, Any], label: str,
                     notes: list[str]) -> float:
    """How many times the adapter's attention out-projection deltas count in its model.

    What ``export-peft`` recorded (``tvtool.out_proj_applied``, the factor it divided by),
    else what the peft that trained it applies (its ``peft_version``, or the installed
    peft's when it records none, noted).

    Raises:
        InvalidInputError: a recorded factor other than 1 or 2, or a ``peft_version`` that is
            not a version.
    """
    exported = recorded.get("out_proj_applied")
    if exported is not None:
        if exported not in ("1", "2"):
            raise InvalidInputError(f"{label}: tvtool.out_proj_applied must be 1 or 2, got "
                                    f"{exported[:20]!r}")
        return float(exported)
    written_by = adapter_config.get("peft_version")
    if not isinstance(written_by, str):
        written_by = installed_peft_version()
        notes.append("the adapter records no peft_version: read as peft "
                     f"{written_by or '0.22+'} computes it")
    try:
        return mha_out_proj_applied(written_by)
    except ValueError as exc:
        raise InvalidInputError(f"{label}: {exc}", hint="adapter_config.json's peft_version "
                                "should read like 0.21.2") from None


def _check_root(module: str, allow_auto: bool) -> None:
    allowed = (*MODULE_ROOTS, "auto") if allow_auto else MODULE_ROOTS
    if module not in allowed:
        raise UsageError(f"--module must be one of {', '.join(allowed)}, got {module!r}")


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportPeftConfig:
    """Configuration of ``tvtool export-peft``.

    Attributes:
        vector: A ``lora`` or ``llora`` task vector (path or ``-``).
        output: The adapter directory to create (must not exist, or be empty).
        module: What the adapter is loaded onto: ``clip`` (the open_clip model) or ``visual``
            (its image tower, ``model.visual``).
        license: The model card's ``license:`` (a Hugging Face identifier); default: the
            base's where tvtool knows it, else none, with a note in the card.
    """

    vector: str
    output: str
    module: str = "clip"
    license: str | None = None


def _card(architecture: str, meta: FileMeta, root: str, config: dict[str, Any],
          license: str | None = None) -> str:
    """The adapter's README.md: publishable (no local paths), saying what to load it onto."""
    onto = "model" if root == "clip" else "model.visual"
    base = card_base(meta.base_ref or architecture, meta.base_fingerprint or "", license)
    if root == "clip":
        load_onto = ("Load it onto the whole open_clip model (`model`): its module names start "
                     "at the model (`visual.transformer...`).")
    else:
        load_onto = ("Load it onto the image tower (`model.visual`), not onto the whole model: "
                     "its module names start inside the tower (`transformer.resblocks...`), "
                     "which the text tower has too, so on the whole model peft would adapt the "
                     "text tower's modules instead wherever their widths coincide, without an "
                     "error.")
    lines = [
        *front_matter(["open_clip", "lora", "tvtool"], library="peft",
                      datasets=[meta.dataset] if meta.dataset else [], base=base), "",
        f"# LoRA adapter for open_clip {architecture}", "",
        f"Exported by tvtool from a `{meta.mode.value if meta.mode else 'lora'}` task vector"
        + (f" (dataset {public_dataset(meta.dataset)})" if meta.dataset else "") + ".", "",
        f"* base model: `{base.name}` (open_clip architecture `{architecture}`)"
        + (f", fingerprint `{base.fingerprint}`" if base.fingerprint else "")
        + (f", weights from the Hugging Face repository `{base.hub_id}`" if base.hub_id else ""),
        f"* loaded onto: `{onto}`; r = {config['r']}, lora_alpha = {config['lora_alpha']}, "
        f"{len(config['target_modules'])} target modules", "", load_onto, "",
        "```python", "import open_clip", "from peft import PeftModel", "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("{architecture}", '
        'pretrained=...)  # the base above',
        f'{"model" if root == "clip" else "model.visual"} = PeftModel.from_pretrained('
        f'{onto}, "ADAPTER_DIR")', "```",
        *license_note(base), "",
    ]
    return "\n".join(lines)


def export_peft(config: ExportPeftConfig, log: Logger = _quiet) -> WriteResult:
    """Write a ``lora``/``llora`` task vector as a peft LoRA adapter directory.

    The adapter changes each weight by exactly the vector's dense delta (alpha/r)·B·A (see
    :func:`tvtool.formats.peft_adapters.lora_vector_to_peft` for the mapping).

    Raises:
        UsageError: an unknown ``module``.
        InvalidInputError: not a task vector; a dense or linearized vector (``llora-net``,
            ``linear``); no architecture recorded; factors peft cannot express; an output
            directory that exists with content.
    """
    from tvtool import __version__

    _check_root(config.module, allow_auto=False)
    if config.license is not None:
        try:
            check_license(config.license)
        except ValueError as exc:
            raise UsageError(f"--license {short_repr(config.license, 40)}: {exc}") from None
    if config.output == STDIO:
        raise UsageError("export-peft writes a directory, not stdout", hint="use -o DIR")
    check_new_directory(config.output)
    source = open_tensors(config.vector)
    try:
        meta = open_vector_meta(source, source.label)
        if meta.mode is Mode.LLORA_NET or (
                meta.linearized and meta.mode is not None and meta.mode.factored):
            raise InvalidInputError(
                f"{source.label} is an llora-net vector (the whole network linearized in the "
                "LoRA factors), which a peft adapter cannot express",
                hint="peft adds (alpha/r)·B·A to the weights; vectors of mode lora or llora "
                     "export")
        if meta.mode is None or not meta.mode.factored:
            what = f"a {meta.mode.value}" if meta.mode else "a dense"
            raise InvalidInputError(
                f"{source.label} is {what} vector; a peft LoRA adapter holds low-rank factors",
                hint="export-peft takes vectors of mode lora or llora (tvtool finetune --mode "
                     "lora|llora)")
        if svd_factored(meta):
            raise InvalidInputError(
                f"{source.label} was compressed by tvtool compress (factors B·A with one rank "
                "per tensor and no alpha), which a peft LoRA config cannot express",
                hint="export the LoRA vector it was compressed from")
        if not meta.architecture:
            raise InvalidInputError(f"{source.label} records no tvtool.architecture; the adapter "
                                    "needs to know the model's module names")
        check_recorded_architecture(meta.architecture, source.label,
                                    "export-peft reads the module names of architectures "
                                    "built offline only", tokenizer=False)
        tensors = {name: source.get(name) for name in source.keys()}
    finally:
        source.close()
    alpha, declared_rank = lora_alpha_rank(meta)
    for name, tensor in tensors.items():
        if name.endswith(SUFFIX_A) and declared_rank is not None and tensor.dim() == 2 \
                and tensor.shape[0] != declared_rank:
            raise InvalidInputError(f"{source.label}: LoRA factor {name!r} has rank "
                                    f"{tensor.shape[0]}, the metadata says {declared_rank}")
    modules = module_table(meta.architecture, config.module)  # type: ignore[arg-type]
    class_name, class_module = root_class(meta.architecture, config.module)  # type: ignore[arg-type]
    adapter = lora_vector_to_peft(tensors, alpha, modules, config.module, label=source.label,
                                  auto_mapping={"base_model_class": class_name,
                                                "parent_library": class_module},
                                  out_proj_applied=MHA_OUT_PROJ_LOADED)
    for note in adapter.notes:
        log(note)
    recorded = {"out_proj_applied": f"{MHA_OUT_PROJ_LOADED:g}",
                "architecture": meta.architecture, "base_ref": meta.base_ref,
                "base_fingerprint": meta.base_fingerprint, "mode": meta.mode.value
                if meta.mode else None, "dataset": meta.dataset, "peft_module": config.module,
                "exported_by": f"tvtool {__version__}"}
    metadata = {"format": "pt", **{PREFIX + k: v for k, v in recorded.items() if v}}
    files = write_peft_adapter(config.output, adapter.config, adapter.tensors, metadata,
                               _card(meta.architecture, meta, config.module, adapter.config,
                                     config.license),
                               inputs=[config.vector])
    log(f"peft adapter for {'the open_clip model' if config.module == 'clip' else 'model.visual'}"
        f" of {meta.architecture}: r={adapter.config['r']}, "
        f"lora_alpha={adapter.config['lora_alpha']}, "
        f"{len(adapter.config['target_modules'])} target modules")
    return WriteResult(config.output, len(adapter.tensors),
                       sum(t.numel() for t in adapter.tensors.values()), adapter.notes,
                       details={"files": files, "r": adapter.config["r"],
                                "lora_alpha": adapter.config["lora_alpha"],
                                "target_modules": len(adapter.config["target_modules"]),
                                "module": config.module, "architecture": meta.architecture})


# ---------------------------------------------------------------- import (convert)


def _guess_root(adapter_config: dict[str, Any], recorded: dict[str, str], architecture: str,
                keys: list[str]) -> tuple[str, str]:
    """The module root of an adapter and how it was decided."""
    if recorded.get("peft_module") in MODULE_ROOTS:
        return recorded["peft_module"], "recorded by tvtool"
    mapping = adapter_config.get("auto_mapping")
    if isinstance(mapping, dict) and isinstance(mapping.get("base_model_class"), str):
        for root in MODULE_ROOTS:
            if root_class(architecture, root)[0] == mapping["base_model_class"]:  # type: ignore[arg-type]
                return root, f"auto_mapping names {mapping['base_model_class']}"
    names = [k.removeprefix("base_model.model.") for k in keys]
    fits = []
    for root in MODULE_ROOTS:
        table = module_table(architecture, root)  # type: ignore[arg-type]
        if names and all(_module_of(n) in table for n in names):
            fits.append(root)
    if len(fits) == 1:
        return fits[0], "the only root whose module names fit"
    raise InvalidInputError(
        "cannot tell whether the adapter was trained on the whole open_clip model or on its "
        "image tower (the module names fit " + ("both" if fits else "neither") + ")",
        hint="pass --module clip (PeftModel on the CLIP model) or --module visual (on "
             "model.visual)")


def _module_of(name: str) -> str:
    """The module a peft key adapts (``X.attn.base_layer.out_proj.lora_A.weight`` -> ``X.attn``)."""
    stem = name.rsplit(".lora_", 1)[0]
    return stem.removesuffix(".base_layer.out_proj")


def convert_peft(config: ConvertConfig, log: Logger = _quiet) -> WriteResult:
    """A peft LoRA adapter directory of an open_clip model -> a tvtool task vector.

    The architecture comes from ``config.base``, ``config.architecture`` or the ``tvtool.*``
    metadata of an adapter tvtool exported; the module root from ``config.module``, that
    metadata, peft's ``auto_mapping`` or the module names.

    Raises:
        UsageError: no architecture known, ``--base`` and ``--architecture`` disagree.
        InvalidInputError: see :func:`tvtool.io.read_peft_adapter` and
            :func:`tvtool.formats.peft_adapters.peft_to_lora_vector`; factors that the base
            lacks; an output that is an input.
    """
    from tvtool.data import recorded_dataset_name

    _check_root(config.module, allow_auto=True)
    weights_path = adapter_weights_path(config.input)
    check_output(config.output, [weights_path])
    adapter = read_peft_adapter(config.input)
    label = repr(adapter.directory)
    recorded = {k[len(PREFIX):]: v for k, v in adapter.metadata.items() if k.startswith(PREFIX)}
    ref = resolve_ref(config.base) if config.base is not None else None
    architecture = ref.architecture if ref is not None else config.architecture
    if ref is not None and config.architecture is not None \
            and config.architecture != ref.architecture:
        raise UsageError(f"--architecture {config.architecture} contradicts the base, which is "
                         f"{ref.architecture}")
    notes: list[str] = []
    if architecture is None:
        architecture = recorded.get("architecture")
        if architecture is None:
            raise UsageError("a peft adapter does not say which open_clip model it adapts",
                             hint="pass --base REF (also records its fingerprint) or "
                                  "--architecture NAME")
        check_recorded_architecture(architecture, label, "pass --base REF or --architecture "
                                    "NAME to name the model yourself", tokenizer=False)
        notes.append(f"architecture {architecture} (recorded by tvtool in the adapter)")
    if config.module != "auto":
        root, how = config.module, "as given"
    else:
        root, how = _guess_root(adapter.config, recorded, architecture, list(adapter.tensors))
    onto = "the open_clip model" if root == "clip" else "its image tower (model.visual)"
    notes.append(f"peft LoRA adapter on {onto} ({how}): {len(adapter.tensors)} tensors")
    modules = module_table(architecture, root)  # type: ignore[arg-type]
    imported = peft_to_lora_vector(
        adapter.config, adapter.tensors, modules, root, label=label,
        out_proj_applied=_out_proj_factor(recorded, adapter.config, label, notes))
    notes.extend(imported.notes)
    base_fp = recorded.get("base_fingerprint") if ref is None else None
    if ref is not None:
        base, ref = base_source(ref)
        try:
            base_fp = fingerprint(base)
            have = set(base.keys())
        finally:
            base.close()
        for target in imported.tensors:
            weight = target.removesuffix(".lora_A").removesuffix(".lora_B")
            if weight not in have:
                raise InvalidInputError(f"the base {config.base!r} has no tensor {weight!r}, "
                                        "which the adapter changes")
        if recorded.get("base_fingerprint") and recorded["base_fingerprint"] != base_fp:
            notes.append("warning: tvtool exported this adapter from a vector of another base "
                         "(fingerprint differs); recording the given base")
    for note in notes:
        log(note)
    mode: Mode | None = None
    if imported.lora is not None:
        mode = Mode.LLORA if recorded.get("mode") == Mode.LLORA.value else Mode.LORA
    dataset = config.dataset if config.dataset is not None else recorded.get("dataset")
    meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=architecture,
                    base_ref=config.base if config.base is not None else recorded.get("base_ref"),
                    base_fingerprint=base_fp, mode=mode, linearized=False,
                    dataset=recorded_dataset_name(dataset) if dataset is not None else None,
                    provenance=provenance("convert", config_args(config)),
                    extra={**(imported.lora or {}),
                           "converted_from": f"peft LoRA adapter ({root} module names)"})
    write_tensors(config.output, imported.tensors, meta.to_header(), inputs=[weights_path])
    return WriteResult(config.output, len(imported.tensors),
                       sum(t.numel() for t in imported.tensors.values()), notes,
                       details={"architecture": architecture, "module": root,
                                "mode": mode.value if mode else None,
                                "factors": imported.lora is not None})


__all__ = ["MODULE_ROOTS", "ExportPeftConfig", "convert_peft", "export_peft"]
