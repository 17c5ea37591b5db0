"""The demo's report: claims checked against measured numbers, Markdown, and figures.

Pure functions from the results document (a JSON-ready dict) to text and PNG bytes; the
caller writes them through :mod:`tvtool.io`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

Results = Mapping[str, Any]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def method_rows(results: Results) -> list[tuple[str, str, dict[str, float], float]]:
    """One row per (mode, method): accuracies per task and their average.

    Returns:
        ``(mode, method, {task: accuracy}, average)`` rows, zero-shot first.
    """
    tasks = results["tasks"]
    rows = [("-", "zero-shot", dict(results["zero_shot"]),
             _mean([results["zero_shot"][t] for t in tasks]))]
    for mode, accs in results["finetuned"].items():
        rows.append((mode, "fine-tuned (each task)", dict(accs), _mean([accs[t] for t in tasks])))
    for mode, methods in results["methods"].items():
        for method, entry in methods.items():
            accs = entry["accuracy"]
            rows.append((mode, method, dict(accs), _mean([accs[t] for t in tasks])))
    return rows


def normalized_average(results: Results, mode: str, method: str) -> float:
    """Average normalized accuracy (accuracy / that mode's fine-tuned accuracy) of a method."""
    tasks = results["tasks"]
    accs = results["methods"][mode][method]["accuracy"]
    ref = results["finetuned"][mode]
    return _mean([accs[t] / ref[t] if ref[t] > 0 else 0.0 for t in tasks])


def gain_recovered(results: Results) -> dict[str, float]:
    """Fraction of the fine-tuning gain that task addition recovers, per mode.

    ``(TA - zero-shot) / (fine-tuned - zero-shot)`` on average accuracies over the tasks,
    the figure the task-arithmetic papers' tables imply (about 0.5 for CLIP ViT-B/32 on the
    eight-task benchmark: (69.7 - 48.2) / (90.5 - 48.2)).

    Returns:
        ``{mode: fraction}`` for every mode with a task-arithmetic result; NaN where
        fine-tuning did not beat zero-shot on average.
    """
    tasks = results["tasks"]
    zero = _mean([results["zero_shot"][t] for t in tasks])
    out: dict[str, float] = {}
    for mode, entries in results["methods"].items():
        if "task_arithmetic" not in entries:
            continue
        fine = _mean([results["finetuned"][mode][t] for t in tasks])
        added = _mean([entries["task_arithmetic"]["accuracy"][t] for t in tasks])
        out[mode] = (added - zero) / (fine - zero) if fine - zero > 1e-9 else float("nan")
    return out


def noise_level(accuracies: Sequence[Mapping[str, float]], tasks: Sequence[str],
                examples: int | None, scale: Mapping[str, float] | None = None,
                ) -> float | None:
    """Two standard errors of the difference between two average accuracies.

    Each accuracy is a binomial proportion over ``examples`` test images per task; the
    average over tasks of one model has variance ``sum(p (1 - p) / n) / T**2``, and a
    difference of two (treated as independent) adds the variances.

    Args:
        accuracies: The two models' accuracies per task.
        tasks: The tasks averaged over.
        examples: Test images per task (``None``: unknown, no noise level).
        scale: Factor per task applied to both accuracies before averaging (``1 / fine-tuned
            accuracy`` for normalized accuracy).

    Returns:
        The noise level in accuracy units, or ``None`` when ``examples`` is unknown.
    """
    if not examples or not tasks:
        return None
    factor = scale or {}
    variance = sum(factor.get(t, 1.0) ** 2 * acc[t] * (1 - acc[t]) / examples
                   for acc in accuracies for t in tasks)
    return float(2 * variance ** 0.5 / len(tasks))


LABELS = {
    "task_arithmetic": "task arithmetic",
    "ties": "TIES ({mode})",
    "tsv": "TSV-M ({mode})",
    "iso-cts": "Iso-CTS ({mode})",
    "atlas_fewshot": "aTLAS (fewshot, {mode})",
    "atlas_unlabelled": "aTLAS (unlabelled, {mode})",
}
"""How the claims name each method (``{mode}`` filled in; task arithmetic is the baseline)."""

COMPARISONS = (
    ("atlas_fewshot", "task_arithmetic"),
    ("atlas_unlabelled", "task_arithmetic"),
    ("ties", "task_arithmetic"),
    ("tsv", "task_arithmetic"),
    ("tsv", "ties"),
    ("iso-cts", "task_arithmetic"),
    ("iso-cts", "ties"),
)
"""``(method, baseline)``: the claims "method beats baseline" the report checks, where both ran:
the aTLAS paper's over task arithmetic, and TSV-M's and Iso-CTS' central ordering (above task
arithmetic and TIES)."""


def _claim(claim: str, held: bool, evidence: str, difference: float | None = None,
           noise: float | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"claim": claim, "held": held, "evidence": evidence}
    if difference is not None and noise is not None:
        entry["within_noise"] = abs(difference) < noise
        entry["evidence"] += f"; difference {difference:+.3f}, noise ±{noise:.3f}"
    return entry


def check_claims(results: Results) -> list[dict[str, Any]]:
    """Compare the papers' claims with this run's numbers.

    Returns:
        One entry per claim that this run measured: ``claim``, ``held`` (bool), ``evidence``,
        and for accuracy comparisons ``within_noise`` (the difference is smaller than two
        standard errors of the test-set sampling, see :func:`noise_level`).
    """
    claims: list[dict[str, Any]] = []
    tasks = results["tasks"]
    examples = results.get("config", {}).get("eval_limit")
    zero_accs = results["zero_shot"]
    zero = _mean([zero_accs[t] for t in tasks])
    for mode, accs in results["finetuned"].items():
        fine = _mean([accs[t] for t in tasks])
        claims.append(_claim(
            f"fine-tuning ({mode}) beats zero-shot on its own task", fine > zero,
            f"average {fine:.3f} vs zero-shot {zero:.3f}", fine - zero,
            noise_level([accs, zero_accs], tasks, examples)))
    methods = results["methods"]
    for mode, entries in methods.items():
        ref = results["finetuned"][mode]
        inverse_ref = {t: 1 / ref[t] if ref[t] > 0 else 0.0 for t in tasks}
        if "task_arithmetic" in entries:
            ta_accs = entries["task_arithmetic"]["accuracy"]
            ta = _mean([ta_accs[t] for t in tasks])
            claims.append(_claim(
                f"task addition ({mode}) gives one model above zero-shot on average",
                ta > zero, f"average {ta:.3f} vs zero-shot {zero:.3f}", ta - zero,
                noise_level([ta_accs, zero_accs], tasks, examples)))
            fine = _mean([ref[t] for t in tasks])
            if fine > zero:
                fraction = (ta - zero) / (fine - zero)
                claims.append({
                    "claim": f"task addition ({mode}) recovers at least half of the "
                             "fine-tuning gain (CLIP ViT-B/32: about 0.5)",
                    "held": fraction >= 0.5,
                    "evidence": f"(TA − zero-shot) / (fine-tuned − zero-shot) = {fraction:.2f}"})
        for other, reference in COMPARISONS:
            if other not in entries or reference not in entries:
                continue
            a = normalized_average(results, mode, other)
            t = normalized_average(results, mode, reference)
            searched = " with searched α" if other.startswith("atlas") else ""
            noise = noise_level([entries[other]["accuracy"], entries[reference]["accuracy"]],
                                tasks, examples, scale=inverse_ref)
            protocol = entries[other].get("protocol")
            how = f" ({protocol} protocol)" if protocol else ""
            claims.append(_claim(
                f"{LABELS[other].format(mode=mode)} beats {LABELS[reference].format(mode=mode)}"
                f"{searched} (normalized accuracy)", a > t, f"{a:.3f} vs {t:.3f}{how}", a - t,
                noise))
    dis = results.get("disentanglement", {})
    if "full" in dis:
        for mode in ("linear", "attn"):
            if mode in dis:
                a, f = dis[mode]["mean_error"], dis["full"]["mean_error"]
                claims.append({
                    "claim": f"{mode} vectors are less entangled than full fine-tuning "
                             "(lower mean disentanglement error)",
                    "held": a < f, "evidence": f"{a:.3f} vs {f:.3f}"})
    neg = results.get("negation")
    if neg:
        base, after = neg["base"], neg["negated"]
        ratio = after["control"] / base["control"] if base["control"] > 0 else 0.0
        claims.append({
            "claim": "negation lowers target accuracy while control stays >= 95% of zero-shot",
            "held": bool(neg.get("feasible", True)) and after["target"] < base["target"]
            and ratio >= 0.95,
            "evidence": f"target {base['target']:.3f} -> {after['target']:.3f}, control "
                        f"{base['control']:.3f} -> {after['control']:.3f} ({ratio:.1%})"})
    return claims


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown(results: Results) -> str:
    """The human-readable report."""
    tasks = results["tasks"]
    lines = ["# tvtool demo report", "",
             f"Base `{results['base']}`, tasks {', '.join(f'`{t}`' for t in tasks)}, "
             f"{'quick' if results['config']['quick'] else 'full'} run, seed "
             f"{results['config']['seed']}. Accuracies in % on the test splits.", "",
             "## Accuracy per method and task", "",
             "| mode | method | " + " | ".join(t.split(":")[-1] for t in tasks) + " | avg |",
             "|---|---|" + "---|" * (len(tasks) + 1)]
    for mode, method, accs, avg in method_rows(results):
        cells = " | ".join(_pct(accs[t]) for t in tasks)
        lines.append(f"| {mode} | {method} | {cells} | {_pct(avg)} |")
    recovered = results.get("gain_recovered") or {}
    if recovered:
        lines += ["", "## Task addition: fraction of the fine-tuning gain recovered", "",
                  "(TA − zero-shot) / (fine-tuned − zero-shot), average accuracies; CLIP "
                  "ViT-B/32 on the 8-task benchmark: about 0.5.", "",
                  "| mode | gain recovered |", "|---|---|"]
        for mode, fraction in recovered.items():
            lines.append(f"| {mode} | {fraction:.2f} |")
    lines += ["", "Coefficients chosen on the validation splits:", ""]
    for mode, methods in results["methods"].items():
        for method, entry in methods.items():
            if entry.get("coef") is not None:
                edge = entry.get("grid_edge")
                note = (f" (the {edge} end of the grid "
                        f"{', '.join(f'{g:g}' for g in entry['grid'])})") if edge else ""
                lines.append(f"- {mode} / {method}: α = {entry['coef']:g}{note}")
    for mode, skipped in (results.get("merge_skipped") or {}).items():
        for method, reason in skipped.items():
            lines.append(f"- {mode} / {method}: not run, `merge` refuses LoRA vectors for it "
                         f"({reason})")
    lines += histogram_markdown(results)
    neg = results.get("negation")
    if neg:
        lines += ["", "## Negation", "",
                  f"Forget `{neg['target']}` while keeping `{neg['control']}` "
                  f"({neg['mode']} vector, α = {neg['coef']}"
                  + ("" if neg.get("feasible", True) else
                     "; no α of the grid kept the control task at 95% on validation, the "
                     "smallest α is shown") + "):", "",
                  "| model | target | control |", "|---|---|---|",
                  f"| zero-shot | {_pct(neg['base']['target'])} | {_pct(neg['base']['control'])} |",
                  f"| negated | {_pct(neg['negated']['target'])} | "
                  f"{_pct(neg['negated']['control'])} |"]
    cosine = results.get("cosine")
    if cosine:
        labels, matrix = cosine["labels"], cosine["matrix"]
        lines += ["", "## Cosine similarity of the task vectors", "",
                  "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for label, row in zip(labels, matrix, strict=True):
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    dis = results.get("disentanglement", {})
    if dis:
        lines += ["", "## Weight disentanglement", "",
                  "Mean disentanglement error over the α grid (lower is less entangled):", ""]
        for mode, entry in dis.items():
            lines.append(f"- {mode}: {entry['mean_error']:.3f} (`{entry['figure']}`)")
        skipped = [m for m in results.get("config", {}).get("modes") or () if m not in dis]
        if skipped:
            lines.append(f"- {', '.join(skipped)}: not mapped")
    lines += ["", "## Claims of the papers on this run", ""]
    for claim in results["claims"]:
        mark = "held" if claim["held"] else "did NOT hold"
        if claim.get("within_noise"):
            mark += " (within noise)"
        lines.append(f"- **{mark}**: {claim['claim']} — {claim['evidence']}")
    lines += ["", "## Figures", ""]
    for figure in results["figures"]:
        lines.append(f"![{figure}]({figure})")
    lines += ["", "## Timings (s)", ""]
    for stage, seconds in results["timings"].items():
        lines.append(f"- {stage}: {seconds:.1f}")
    return "\n".join(lines) + "\n"


def histogram_markdown(results: Results) -> list[str]:
    """The histogram check of the label-free aTLAS runs, as Markdown lines.

    One table per mode: every candidate's predicted-class entropy as a fraction of the class
    prior's (and the share of the most predicted class) per task, and the collapse guard's
    verdict; the kept candidate is marked.
    """
    lines: list[str] = []
    for mode, methods in results["methods"].items():
        entry = methods.get("atlas_unlabelled")
        check = entry.get("histogram") if entry else None
        if not check:
            continue
        tasks = check["tasks"]
        if not lines:
            lines += ["", "## Histogram check (unlabelled aTLAS)", "",
                      "Per candidate and task: entropy of the histogram of predicted classes / "
                      "entropy of the class prior (1: spread like the classes; share of the "
                      "most predicted class in brackets). The collapse guard rejects a "
                      "candidate below 0.75 of the prior's, or below 0.9 of the zero-shot "
                      "model's, on some task."]
        applied = ("the protocol's selection applies the guard" if check["guard_applied"]
                   else "the protocol's selection does not read it (the guard's verdict is "
                        "shown all the same)")
        lines += ["", f"{mode} vectors, {entry.get('protocol')} protocol (selection: "
                      f"{entry.get('selection')}), kept step {check['kept_step']}; "
                      f"{applied}:", "",
                  "| step | " + " | ".join(t.split(":")[-1] for t in tasks) + " | guard |",
                  "|---|" + "---|" * (len(tasks) + 1)]
        for row in check["candidates"]:
            cells = []
            for task in tasks:
                stats = row["datasets"].get(task) or {}
                ratio, top = stats.get("class_entropy_ratio"), stats.get("top_share")
                cells.append("-" if ratio is None else
                             f"{ratio:.2f} ({100 * (top or 0.0):.0f}%)")
            verdict = ("rejected: " + "; ".join(row["rejected"])) if row["rejected"] else "passes"
            # the demo's runs start every coefficient at 0: step 0 is the zero-shot model
            zero = row.get("note") or (row["step"] == 0 and entry.get("init", 0.0) == 0.0)
            step = f"{row['step']}" + (" (zero-shot)" if zero else "")
            if row["kept"]:
                step = f"**{step}, kept**"
            lines.append(f"| {step} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def accuracy_figure(results: Results) -> bytes:
    """Grouped bars: accuracy per method (rows of :func:`method_rows`) and task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = method_rows(results)
    tasks = results["tasks"]
    figure, axis = plt.subplots(figsize=(max(7, 0.9 * len(rows)), 4))
    width = 0.8 / len(tasks)
    for index, task in enumerate(tasks):
        xs = [r + index * width for r in range(len(rows))]
        axis.bar(xs, [100 * row[2][task] for row in rows], width, label=task.split(":")[-1])
    axis.set_xticks([r + 0.4 - width / 2 for r in range(len(rows))])
    axis.set_xticklabels([f"{m}\n{n}" if m != "-" else n for m, n, _, _ in rows], fontsize=7,
                         rotation=30, ha="right")
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=7, ncol=min(len(tasks), 6))
    axis.set_title("Accuracy per method and task")
    return _png(figure)


def cosine_figure(labels: Sequence[str], matrix: Sequence[Sequence[float]], title: str) -> bytes:
    """Heatmap of the cosine-similarity matrix of task vectors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = len(labels)
    figure, axis = plt.subplots(figsize=(1.0 + 0.7 * size, 0.8 + 0.6 * size))
    image = axis.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    axis.set_xticks(range(size), labels, rotation=45, ha="right", fontsize=7)
    axis.set_yticks(range(size), labels, fontsize=7)
    for i in range(size):
        for j in range(size):
            axis.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=6)
    figure.colorbar(image, ax=axis)
    axis.set_title(title)
    return _png(figure)
