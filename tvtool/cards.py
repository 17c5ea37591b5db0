"""Model cards (README.md) for edited models shared as open_clip Hugging Face directories.

The card records the recipe the way mergekit's cards do: what the base was, every task vector
that went in (dataset, fine-tuning mode, fingerprint, and for merged vectors the merge method,
its parameters, coefficients and the records of the vectors merged), and the coefficients they
were applied with, in a YAML front matter the hub reads (``datasets``, ``base_model``,
``license``) and in readable Markdown.

A card is written to be published: it names files by their file name and fingerprint, never
by a local path (:func:`public_dataset`, :func:`public_file`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

_IMAGEFOLDER = "imagefolder:"
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+_-]{0,63}")


def public_file(path: str) -> str:
    """A path as a card publishes it: its file name (``stdin`` for ``-``)."""
    return "stdin" if path == "-" else PurePath(path).name or path


def public_dataset(name: str) -> str:
    """A dataset name as a card publishes it: ``imagefolder:`` keeps the folder's name only.

    Recorded image-folder datasets hold absolute local paths (``imagefolder:/home/me/data``);
    other names (``MNIST``, ``synthetic:shape``) are public already.
    """
    if name.strip().lower().startswith(_IMAGEFOLDER):
        folder = name.strip()[len(_IMAGEFOLDER):].strip().rstrip("/")
        return _IMAGEFOLDER + (PurePath(folder).name or folder)
    return name


def _public_label(label: str) -> str:
    """A merge's source label (a dataset, or the path of a vector without one), published."""
    if label.strip().lower().startswith(_IMAGEFOLDER):
        return public_dataset(label)
    return public_file(label) if "/" in label or "\\" in label else label


def check_license(value: str) -> str:
    """A Hugging Face license identifier (``mit``, ``apache-2.0``, ``cc-by-4.0``, ``other``).

    Raises:
        ValueError: not a lowercase identifier of at most 64 characters.
    """
    if not _LICENSE.fullmatch(value):
        raise ValueError("a license is a lowercase Hugging Face identifier such as mit, "
                         "apache-2.0, cc-by-4.0 or other")
    return value


@dataclass(frozen=True)
class CardBase:
    """The base model as a card publishes it.

    Attributes:
        name: Its reference without local paths (``ViT-B-32:openai``, ``tvtool-tiny``,
            ``ViT-B-32:weights.pt``, ``base.safetensors``).
        fingerprint: ``sha256:`` of its tensors.
        hub_id: The Hugging Face repository of its weights, when they come from the hub
            (the card's ``base_model:``).
        license: The license identifier for the card's ``license:`` (None: not known).
    """

    name: str
    fingerprint: str
    hub_id: str | None = None
    license: str | None = None


def front_matter(tags: Sequence[str], *, library: str, datasets: Iterable[str] = (),
                 base: CardBase | None = None, pipeline: str | None = None) -> list[str]:
    """The YAML front matter lines of a card (``---`` included).

    Args:
        tags: The card's tags.
        library: ``library_name``.
        datasets: Dataset names (published forms, sorted, duplicates dropped).
        base: Gives ``base_model`` and ``license`` where known.
        pipeline: ``pipeline_tag``.
    """
    lines = ["---"]
    if base is not None and base.license:
        lines.append(f"license: {base.license}")
    if base is not None and base.hub_id:
        lines.append(f"base_model: {_yaml_string(base.hub_id)}")
    lines.append("tags:")
    lines.extend(f"- {tag}" for tag in tags)
    lines.append(f"library_name: {library}")
    if pipeline:
        lines.append(f"pipeline_tag: {pipeline}")
    names = sorted({public_dataset(d) for d in datasets if d})
    if names:
        lines.append("datasets:")
        lines.extend(f"- {_yaml_string(d)}" for d in names)
    lines.append("---")
    return lines


def license_note(base: CardBase) -> list[str]:
    """The card's paragraph saying the license is not recorded (empty when it is)."""
    if base.license:
        return []
    return ["", "**License:** not stated. tvtool does not know the license of the base's "
                "weights, which the edited weights inherit; add a `license:` field to the "
                "front matter (or rerun with `--license ID`) before publishing."]


@dataclass(frozen=True)
class CardVector:
    """One task vector as the card records it.

    Attributes:
        file: The file name it was read from.
        coefficient: The coefficient it was applied with.
        dataset: Its dataset, when recorded.
        mode: Its fine-tuning mode, when recorded.
        linearized: Whether it is a linearized vector.
        fingerprint: ``sha256:`` of its tensors (names, dtypes, shapes, bytes).
        merge: For a merged vector: ``method``, ``params``, ``sources``, ``coefficients`` and
            ``source_records`` (one ``{file, dataset, mode, linearized, fingerprint}`` per
            vector merged, where the merge recorded them).
    """

    file: str
    coefficient: float
    dataset: str | None = None
    mode: str | None = None
    linearized: bool = False
    fingerprint: str | None = None
    merge: dict[str, Any] = field(default_factory=dict)


def _yaml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def _records(vector: CardVector) -> list[dict[str, Any]]:
    records = vector.merge.get("source_records")
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def model_card(*, architecture: str, base: CardBase, vectors: Sequence[CardVector],
               tvtool_version: str) -> str:
    """The README.md of an edited model.

    Args:
        architecture: open_clip model name of the base.
        base: The base as published (name without local paths, fingerprint, hub id, license).
        vectors: The vectors applied, in order.
        tvtool_version: The tvtool version that wrote the model.

    Returns:
        Markdown with a YAML front matter (``library_name: open_clip``; ``datasets`` of every
        vector applied and of every vector a merged one was made from; ``base_model`` and
        ``license`` where known).
    """
    datasets = [v.dataset for v in vectors if v.dataset]
    datasets += [str(r["dataset"]) for v in vectors for r in _records(v) if r.get("dataset")]
    lines = front_matter(["clip", "open_clip", "task-arithmetic", "tvtool"],
                         library="open_clip", datasets=datasets, base=base,
                         pipeline="zero-shot-image-classification")
    lines += ["", f"# {architecture} edited with task vectors", "",
              f"An open_clip `{architecture}` model: the base `{base.name}` plus "
              f"{len(vectors)} task vector{'s' if len(vectors) != 1 else ''}, applied with "
              f"`tvtool apply` (tvtool {tvtool_version}). Weights are the complete state dict "
              "in `open_clip_model.safetensors`; `open_clip_config.json` holds the open_clip "
              "model and preprocessing config.", "",
              "## Usage", "", "```python", "import open_clip", "",
              "model, _, preprocess = open_clip.create_model_and_transforms("
              "'hf-hub:ORG/NAME')  # or 'local-dir:PATH'",
              "tokenizer = open_clip.get_tokenizer('hf-hub:ORG/NAME')", "```", "",
              "## Recipe", "",
              f"- **Base:** `{base.name}` (architecture `{architecture}`, fingerprint "
              f"`{base.fingerprint}`"
              + (f", weights from the Hugging Face repository `{base.hub_id}`"
                 if base.hub_id else "") + ")",
              "- **Operation:** θ = θ_base + Σ_i λ_i · τ_i (weight space)", "",
              "| # | vector | λ | dataset | mode | linearized | fingerprint |",
              "|---|---|---|---|---|---|---|"]
    for index, vector in enumerate(vectors, 1):
        lines.append(f"| {index} | `{public_file(vector.file)}` | {vector.coefficient:g} | "
                     f"{public_dataset(vector.dataset) if vector.dataset else '-'} | "
                     f"{vector.mode or '-'} | {'yes' if vector.linearized else 'no'} | "
                     f"`{vector.fingerprint or '-'}` |")
    for index, vector in enumerate(vectors, 1):
        if not vector.merge:
            continue
        lines += ["", f"### Vector {index} is a merge", "",
                  f"- **Method:** `{vector.merge.get('method', '?')}`"]
        if vector.merge.get("params"):
            params = json.dumps(vector.merge["params"], sort_keys=True)
            lines.append(f"- **Parameters:** `{params}`")
        if vector.merge.get("coefficients") is not None:
            lines.append("- **Merge coefficients:** "
                         f"`{json.dumps(vector.merge['coefficients'], sort_keys=True)}`")
        records = _records(vector)
        if records:
            lines += ["", "| merged vector | dataset | mode | linearized | fingerprint |",
                      "|---|---|---|---|---|"]
            for record in records:
                dataset = record.get("dataset")
                lines.append(
                    f"| `{public_file(str(record.get('file') or '-'))}` | "
                    f"{public_dataset(str(dataset)) if dataset else '-'} | "
                    f"{record.get('mode') or '-'} | {'yes' if record.get('linearized') else 'no'}"
                    f" | `{record.get('fingerprint') or '-'}` |")
        elif vector.merge.get("sources"):  # merged by a tvtool that kept labels only
            lines.append("- **Merged vectors:** " + ", ".join(
                f"`{_public_label(str(s))}`" for s in vector.merge["sources"]))
    if any(v.linearized for v in vectors):
        lines += ["", "Linearized vectors were added to the weights, which only approximates the "
                      "linearized model they were trained as (`--approximate-linearized`)."]
    lines += license_note(base)
    lines += ["", "The same recipe is recorded in the `tvtool.*` metadata of "
                  "`open_clip_model.safetensors` (`tvtool inspect` shows it).", ""]
    return "\n".join(lines)
