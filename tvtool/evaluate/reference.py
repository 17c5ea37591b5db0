"""Reference accuracies for normalized accuracy (accuracy / fine-tuned accuracy).

Normalized accuracy (Ilharco et al., 2212.04089; Ortiz-Jimenez et al., 2305.12827) divides the
accuracy of an edited model on a task by the accuracy of the model fine-tuned on that task.
The fine-tuned accuracies come from earlier ``tvtool eval --json`` documents. Accepted shapes:

* an eval report (``{"results": [{"dataset": ..., "accuracy": ...}, ...], "model": ...}``);
  when its model is a single task vector that records its training dataset, only that
  dataset's accuracy is taken (the fine-tuned model on its own task);
* a list of such reports (one per fine-tuned model);
* a mapping ``{dataset: accuracy}`` or ``{dataset: {"accuracy": a, "num_classes": c}}``.

Accuracies are fractions in ``[0, 1]``. Dataset names are compared as
:func:`tvtool.data.dataset_identity` spells them (``imagefolder:`` paths absolute, standard
names in their canonical case), in documents and in vectors alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tvtool.data import dataset_identity
from tvtool.errors import InvalidInputError
from tvtool.io import read_json
from tvtool.limits import short_repr


@dataclass(frozen=True)
class ReferenceEntry:
    """The fine-tuned accuracy of one dataset.

    Attributes:
        accuracy: Top-1 accuracy in ``(0, 1]``.
        source: Where it came from (file and position) for messages.
        num_classes: Class count the reference was measured with, if recorded.
        split: Split it was measured on, if recorded.
    """

    accuracy: float
    source: str
    num_classes: int | None = None
    split: str | None = None


def load_references(paths: Sequence[str]) -> dict[str, ReferenceEntry]:
    """Read reference accuracies from JSON files and merge them.

    Raises:
        InvalidInputError: unreadable or malformed files, accuracies outside ``(0, 1]``, the
            same dataset with two different accuracies.
    """
    merged: dict[str, ReferenceEntry] = {}
    for path in paths:
        for name, entry in references_from_document(read_json(path), repr(path)).items():
            _merge(merged, name, entry)
    return merged


def references_from_document(document: Any, label: str) -> dict[str, ReferenceEntry]:
    """Reference accuracies held by one JSON document (see the module docstring).

    Raises:
        InvalidInputError: the document has none of the accepted shapes.
    """
    merged: dict[str, ReferenceEntry] = {}
    if isinstance(document, list):
        if not document:
            raise InvalidInputError(f"{label} is an empty list, expected eval reports")
        for index, item in enumerate(document):
            for name, entry in references_from_document(item, f"{label}[{index}]").items():
                _merge(merged, name, entry)
        return merged
    if not isinstance(document, Mapping) or not document:
        raise InvalidInputError(f"{label} holds no reference accuracies",
                                hint="pass a `tvtool eval --json` report or a mapping "
                                     "{dataset: accuracy}")
    if "results" in document:
        return _from_report(document, label)
    for name, value in document.items():
        where = f"{label}[{short_repr(name, 80)}]"
        if isinstance(value, Mapping):
            entry = _entry(value.get("accuracy"), where, value.get("num_classes"),
                           value.get("split"))
        else:
            entry = _entry(value, where)
        _merge(merged, dataset_identity(str(name)), entry)
    return merged


def _from_report(document: Mapping[str, Any], label: str) -> dict[str, ReferenceEntry]:
    results = document.get("results")
    if not isinstance(results, list) or not results:
        raise InvalidInputError(f"{label} has no results")
    entries: dict[str, ReferenceEntry] = {}
    for index, item in enumerate(results):
        if not isinstance(item, Mapping) or "dataset" not in item:
            raise InvalidInputError(f"{label}: results[{index}] has no dataset")
        name = dataset_identity(str(item["dataset"]))
        entries[name] = _entry(item.get("accuracy"), f"{label} ({name})",
                               item.get("num_classes"), item.get("split"))
    own = _own_dataset(document.get("model"))
    if own is not None and own in entries:
        return {own: entries[own]}
    return entries


def _own_dataset(model: Any) -> str | None:
    """The training dataset of a report's model, when it is one task vector."""
    if not isinstance(model, Mapping):
        return None
    vectors = model.get("vectors")
    if isinstance(vectors, list) and len(vectors) == 1 and isinstance(vectors[0], Mapping):
        dataset = vectors[0].get("dataset")
        return dataset_identity(str(dataset)) if dataset else None
    return None


def _entry(value: Any, label: str, num_classes: Any = None, split: Any = None) -> ReferenceEntry:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(float(value)):
        raise InvalidInputError(f"{label}: accuracy must be a number, got "
                                f"{short_repr(value, 40)}")
    accuracy = float(value)
    if not 0.0 < accuracy <= 1.0:
        raise InvalidInputError(
            f"{label}: reference accuracy {accuracy} is outside (0, 1]",
            hint="accuracies are fractions (0.93, not 93); a zero reference makes normalized "
                 "accuracy undefined")
    classes = None
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise InvalidInputError(f"{label}: num_classes must be a positive integer, got "
                                    f"{short_repr(num_classes, 40)}")
        classes = num_classes
    return ReferenceEntry(accuracy, label, classes, str(split) if split is not None else None)


def _merge(merged: dict[str, ReferenceEntry], name: str, entry: ReferenceEntry) -> None:
    previous = merged.get(name)
    if previous is not None and (previous.accuracy != entry.accuracy
                                 or previous.num_classes != entry.num_classes):
        raise InvalidInputError(
            f"two reference accuracies for {name!r}: {previous.accuracy} ({previous.source}) "
            f"and {entry.accuracy} ({entry.source})",
            hint="give one fine-tuned result per dataset")
    merged[name] = entry


def check_reference(name: str, entry: ReferenceEntry, num_classes: int, split: str,
                    notes: list[str]) -> None:
    """Refuse a reference measured on a different class list; note a different split.

    Raises:
        InvalidInputError: class counts differ.
    """
    if entry.num_classes is not None and entry.num_classes != num_classes:
        raise InvalidInputError(
            f"the reference for {name!r} ({entry.source}) was measured with "
            f"{entry.num_classes} classes, the dataset has {num_classes}",
            hint="the reference belongs to another version of the dataset")
    if entry.split is not None and entry.split != split:
        notes.append(f"the reference for {name!r} was measured on the {entry.split} split, "
                     f"this evaluation uses {split}")
