"""Model cards (README.md) for edited models shared as open_clip Hugging Face directories.

The card records the recipe the way mergekit's cards do: what the base was, every task vector
that went in (dataset, fine-tuning mode, fingerprint, and for merged vectors the merge method,
its parameters and coefficients), and the coefficients they were applied with, in a YAML
front matter the hub reads and in readable Markdown.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


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
        merge: For a merged vector: ``method``, ``params``, ``sources``, ``coefficients``.
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


def model_card(*, architecture: str, base_ref: str, base_fingerprint: str,
               vectors: Sequence[CardVector], tvtool_version: str) -> str:
    """The README.md of an edited model.

    Args:
        architecture: open_clip model name of the base.
        base_ref: The base's model reference as given.
        base_fingerprint: ``sha256:`` of the base tensors.
        vectors: The vectors applied, in order.
        tvtool_version: The tvtool version that wrote the model.

    Returns:
        Markdown with a YAML front matter (``library_name: open_clip``).
    """
    datasets = sorted({v.dataset for v in vectors if v.dataset})
    lines = ["---", "tags:", "- clip", "- open_clip", "- task-arithmetic", "- tvtool",
             "library_name: open_clip", "pipeline_tag: zero-shot-image-classification"]
    if datasets:
        lines.append("datasets:")
        lines.extend(f"- {_yaml_string(d)}" for d in datasets)
    lines += ["---", "", f"# {architecture} edited with task vectors", "",
              f"An open_clip `{architecture}` model: the base `{base_ref}` plus "
              f"{len(vectors)} task vector{'s' if len(vectors) != 1 else ''}, applied with "
              f"`tvtool apply` (tvtool {tvtool_version}). Weights are the complete state dict "
              "in `open_clip_model.safetensors`; `open_clip_config.json` holds the open_clip "
              "model and preprocessing config.", "",
              "## Usage", "", "```python", "import open_clip", "",
              "model, _, preprocess = open_clip.create_model_and_transforms("
              "'hf-hub:ORG/NAME')  # or 'local-dir:PATH'",
              "tokenizer = open_clip.get_tokenizer('hf-hub:ORG/NAME')", "```", "",
              "## Recipe", "",
              f"- **Base:** `{base_ref}` (architecture `{architecture}`, fingerprint "
              f"`{base_fingerprint}`)",
              "- **Operation:** θ = θ_base + Σ_i λ_i · τ_i (weight space)", "",
              "| # | vector | λ | dataset | mode | linearized | fingerprint |",
              "|---|---|---|---|---|---|---|"]
    for index, vector in enumerate(vectors, 1):
        lines.append(f"| {index} | `{vector.file}` | {vector.coefficient:g} | "
                     f"{vector.dataset or '-'} | {vector.mode or '-'} | "
                     f"{'yes' if vector.linearized else 'no'} | `{vector.fingerprint or '-'}` |")
    for index, vector in enumerate(vectors, 1):
        if not vector.merge:
            continue
        lines += ["", f"### Vector {index} is a merge", "",
                  f"- **Method:** `{vector.merge.get('method', '?')}`"]
        if vector.merge.get("params"):
            params = json.dumps(vector.merge["params"], sort_keys=True)
            lines.append(f"- **Parameters:** `{params}`")
        if vector.merge.get("sources"):
            lines.append("- **Merged vectors:** " + ", ".join(
                f"`{s}`" for s in vector.merge["sources"]))
        if vector.merge.get("coefficients") is not None:
            lines.append("- **Merge coefficients:** "
                         f"`{json.dumps(vector.merge['coefficients'], sort_keys=True)}`")
    if any(v.linearized for v in vectors):
        lines += ["", "Linearized vectors were added to the weights, which only approximates the "
                      "linearized model they were trained as (`--approximate-linearized`)."]
    lines += ["", "The same recipe is recorded in the `tvtool.*` metadata of "
                  "`open_clip_model.safetensors` (`tvtool inspect` shows it).", ""]
    return "\n".join(lines)
