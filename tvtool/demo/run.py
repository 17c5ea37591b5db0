"""``tvtool demo``: the whole workflow on the embedded world, offline, on a CPU.

Stages (each cached in the output directory, so a re-run reuses what it already made):
fine-tune every task in every mode, evaluate zero-shot and fine-tuned accuracy, merge per
mode (task arithmetic, TIES, TSV-M and Iso-CTS, α searched on the validation splits), learn
aTLAS coefficients (few-shot labelled, and unlabelled under the objective's default protocol,
with the predicted-class histogram of every candidate), negate one task against a control,
measure weight disentanglement per mode and the cosine similarity of the vectors, then write
the report (Markdown + JSON + PNG figures).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tvtool.demo import report
from tvtool.errors import InvalidInputError, UsageError
from tvtool.evaluate.accuracy import ProgressFactory, no_progress
from tvtool.io import ensure_directory as ensure_dir
from tvtool.io import read_json, remove_file, write_bytes, write_json
from tvtool.types import Logger

QUICK_TASKS = ("synthetic:shape", "synthetic:color", "synthetic:count")
FULL_TASKS = ("synthetic:shape", "synthetic:color", "synthetic:count", "synthetic:position",
              "synthetic:texture", "synthetic:digit")
QUICK_MODES = ("full", "attn", "linear")
FULL_MODES = ("full", "attn", "linear", "lora", "llora")
MERGE_METHODS = ("task_arithmetic", "ties", "tsv", "iso-cts")
"""The merging stage's methods (registry names), each with its α searched per mode."""
FEWSHOT_PROTOCOL = "tvtool"
"""Protocol of the few-shot stage (the label-free one runs its objective's default)."""


@dataclass(frozen=True)
class DemoConfig:
    """Configuration of ``tvtool demo``.

    Attributes:
        out: Output directory (report, figures, and the cached artefacts).
        quick: The short run (3 tasks, 3 modes, small evaluation subsets).
        base: Model reference of the pre-trained base.
        seed: Seed of every stage.
        device: ``auto``, ``cpu`` or ``cuda``.
        tasks: Datasets to fine-tune on (default depends on ``quick``).
        modes: Fine-tuning modes (default depends on ``quick``).
        steps: Fine-tuning steps per task (default depends on ``quick``).
        batch_size: Fine-tuning batch size.
        lr: Fine-tuning learning rate.
        eval_limit: Examples per split evaluated (None: the whole split).
        smoke: Internal, for the test suite: every stage runs end to end on the smallest
            budgets (short grids, a few aTLAS steps, a 3 x 3 disentanglement map). The
            numbers mean nothing; the CLI never sets it.
    """

    out: str = "tvtool-demo"
    quick: bool = False
    base: str = "tvtool-small"
    seed: int = 0
    device: str = "auto"
    tasks: tuple[str, ...] | None = None
    modes: tuple[str, ...] | None = None
    steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    eval_limit: int | None = None
    smoke: bool = False

    def resolved(self) -> DemoConfig:
        """Fill the defaults that depend on ``quick``."""
        return replace(
            self,
            tasks=self.tasks or (QUICK_TASKS if self.quick else FULL_TASKS),
            modes=self.modes or (QUICK_MODES if self.quick else FULL_MODES),
            # Sized for the budgets on a 2-core CPU (quick <= 3 min, full <= 15 min; measured
            # figures in docs/demo.md).
            steps=self.steps if self.steps is not None else (80 if self.quick else 120),
            eval_limit=self.eval_limit if self.eval_limit is not None
            else (200 if self.quick else 300),
        )


def _key(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class _Stages:
    """Runs stages with caching of their JSON results and timing of each."""

    def __init__(self, root: Path, log: Logger, progress: ProgressFactory) -> None:
        self.root = root
        self.cache = root / "cache"
        ensure_dir(str(self.cache))
        self.log = log
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self.log(f"[demo] {name}")
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def cached_json(self, name: str, key: str, compute: Callable[[], Any]) -> Any:
        path = self.cache / f"{name}-{key}.json"
        if path.is_file():
            try:
                return read_json(str(path))
            except InvalidInputError:
                remove_file(str(path))
        value = compute()
        write_json(str(path), value)
        return value


def run_demo(config: DemoConfig, log: Logger,
             progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """Run the demo and write its report into ``config.out``.

    Args:
        config: What to run.
        log: Receives one line per stage and note.
        progress: Progress-bar factory handed to every stage (fine-tuning, evaluation,
            searches, aTLAS, disentanglement).

    Returns:
        The results document (also written as ``report.json``).
    """
    from tvtool.data import data_source
    from tvtool.device import resolve_device
    from tvtool.evaluate import EvalConfig, EvalSettings, evaluate
    from tvtool.finetune import FinetuneConfig, finetune
    from tvtool.metadata import Mode
    from tvtool.models import base_source, fingerprint

    cfg = config.resolved()
    assert cfg.tasks is not None and cfg.modes is not None and cfg.steps is not None
    # Every refusal comes before the output directory is made: a typo in --base or --device
    # must not leave an empty report folder behind.
    if cfg.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {cfg.steps}")
    resolve_device(cfg.device)
    source, _ = base_source(cfg.base)
    try:
        base_fp = fingerprint(source)
    finally:
        source.close()
    root = Path(cfg.out)
    stages = _Stages(root, log, progress)
    vectors_dir = root / "vectors"
    ensure_dir(str(vectors_dir))
    tasks = list(cfg.tasks)
    # Cached vectors and accuracies are keyed by their data too, so that a run into an old
    # --out after the world's generator changed does not reuse results of the old images.
    sources = {task: data_source(task) for task in tasks}
    limit = cfg.eval_limit

    def eval_accs(vectors: tuple[str, ...] = (), coefs: tuple[float, ...] = (1.0,),
                  base: str = cfg.base, datasets: tuple[str, ...] = tuple(tasks),
                  split: str = "test") -> dict[str, float]:
        key = _key("eval", base, base_fp, [_file_key(v) for v in vectors], coefs, datasets,
                   [sources[d] for d in datasets], split, limit, cfg.seed)

        def compute() -> dict[str, float]:
            settings = EvalSettings(base=base, device=cfg.device, limit=limit, seed=cfg.seed)
            rep = evaluate(EvalConfig(settings, datasets=datasets, vectors=vectors,
                                      coefs=coefs, split=split), progress=progress)
            return {r.dataset: r.accuracy for r in rep.results}

        return stages.cached_json("eval", key, compute)  # type: ignore[no-any-return]

    # ---- fine-tuning
    vector_paths: dict[str, dict[str, str]] = {}
    with stages.timed("fine-tuning"):
        for mode in cfg.modes:
            vector_paths[mode] = {}
            for task in tasks:
                # LoRA vectors cached before the q,v targets and per-adapter L-LoRA differ.
                key = _key("ft", base_fp, mode, task, sources[task], cfg.steps,
                           cfg.batch_size, cfg.lr, cfg.seed,
                           *(("lora-qv",) if "lora" in mode else ()))
                path = vectors_dir / f"{mode}-{task.split(':')[-1]}-{key}.safetensors"
                if not path.is_file():
                    log(f"[demo] fine-tuning {task} ({mode}, {cfg.steps} steps)")
                    with _step_progress(progress, f"fine-tuning {task.split(':')[-1]} "
                                        f"({mode})", cfg.steps) as step_reached:
                        finetune(FinetuneConfig(base=cfg.base, dataset=task,
                                                output=str(path), mode=Mode(mode),
                                                steps=cfg.steps, batch_size=cfg.batch_size,
                                                lr=cfg.lr, warmup_steps=max(1, cfg.steps // 10),
                                                device=cfg.device, seed=cfg.seed),
                                 progress=step_reached, metrics=False)
                vector_paths[mode][task] = str(path)

    # ---- zero-shot and fine-tuned accuracy
    with stages.timed("evaluation"):
        zero_shot = eval_accs()
        finetuned = {mode: {task: eval_accs((paths[task],), datasets=(task,))[task]
                            for task in tasks} for mode, paths in vector_paths.items()}

    results: dict[str, Any] = {
        "base": cfg.base, "base_fingerprint": base_fp, "tasks": tasks,
        "config": {k: v for k, v in asdict(cfg).items()},
        "vectors": vector_paths, "zero_shot": zero_shot, "finetuned": finetuned,
        "methods": {}, "figures": [],
    }

    # ---- merging with α searched on validation splits
    with stages.timed("merging"):
        from tvtool.merge.registry import get_method

        results["merge_skipped"] = {}
        for mode, paths in vector_paths.items():
            methods = []
            for method in MERGE_METHODS:
                refusal = get_method(method).lora_refusal
                if refusal is not None and Mode(mode).factored:
                    # Iso-CTS flattens the spectrum of each summed matrix: `merge` refuses
                    # LoRA vectors for it, so the demo reports why instead of a number.
                    results["merge_skipped"].setdefault(mode, {})[method] = refusal
                    continue
                methods.append(method)
            results["methods"][mode] = _merges_searched(
                cfg, stages, mode, methods, [paths[t] for t in tasks], tasks, log)

    # ---- aTLAS on the full-mode vectors (and linear ones in the full run)
    with stages.timed("aTLAS"):
        atlas_modes = [m for m in ("full",) + (() if cfg.quick else ("linear",))
                       if m in vector_paths]
        for mode in atlas_modes:
            mode_paths = [vector_paths[mode][t] for t in tasks]
            # Unlabelled: aTLAS' own test-time objective (learn_ufm.py) under its default
            # protocol, the reference's (`atlas`).
            for objective, name in (("ce", "atlas_fewshot"), ("ufm", "atlas_unlabelled")):
                results["methods"][mode][name] = _atlas(cfg, stages, mode, objective, mode_paths,
                                                        tasks, eval_accs, log)

    # ---- negation: forget the first task, keep the second
    with stages.timed("negation"):
        neg_mode = "linear" if "linear" in vector_paths else cfg.modes[0]
        results["negation"] = _negate(cfg, stages, neg_mode, vector_paths[neg_mode][tasks[0]],
                                      tasks[0], tasks[1], log)

    # ---- weight disentanglement and cosine similarity per mode
    with stages.timed("disentanglement"):
        results["disentanglement"] = {}
        for mode, paths in vector_paths.items():
            entry = _disentangle(cfg, stages, mode, paths[tasks[0]], paths[tasks[1]],
                                 tasks[0], tasks[1])
            figure = f"disentanglement-{mode}.png"
            write_bytes(str(root / figure), bytes.fromhex(entry.pop("png_hex")))
            entry["figure"] = figure
            results["disentanglement"][mode] = entry
            results["figures"].append(figure)
    with stages.timed("cosine similarity"):
        from tvtool.commands.inspect import InspectConfig
        from tvtool.commands.inspect import inspect as run_inspect

        labels, paths_all = [], []
        for mode in cfg.modes:
            for task in tasks:
                labels.append(f"{mode}:{task.split(':')[-1]}")
                paths_all.append(vector_paths[mode][task])
        inspect = run_inspect(InspectConfig(files=tuple(paths_all), top=0))
        results["cosine"] = {"labels": labels, "matrix": inspect["cosine"]}
        write_bytes(str(root / "cosine.png"),
                    report.cosine_figure(labels, inspect["cosine"], "Cosine similarity of "
                                         "task vectors"))
        results["figures"].append("cosine.png")

    write_bytes(str(root / "accuracy.png"), report.accuracy_figure(results))
    results["figures"].insert(0, "accuracy.png")
    results["gain_recovered"] = report.gain_recovered(results)
    results["claims"] = report.check_claims(results)
    results["timings"] = stages.timings
    write_json(str(root / "report.json"), results)
    write_bytes(str(root / "report.md"), report.markdown(results).encode("utf-8"))
    return results


@contextmanager
def _step_progress(progress: ProgressFactory, description: str,
                   total: int) -> Iterator[Callable[[Any], None]]:
    """A bar for ``finetune``'s progress reports, which carry the steps done so far."""
    with progress(description, total) as advance:
        done = 0

        def step_reached(entry: Any) -> None:
            nonlocal done
            advance(entry.step - done, loss=entry.loss, lr=entry.lr,
                    **{"img/s": entry.images_per_s})
            done = entry.step

        yield step_reached


def _file_key(path: str) -> str:
    """Identify a file by name, size and modification time (cheap cache key)."""
    stat = Path(path).stat()
    return f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}"


def demo_grid(cfg: DemoConfig, method: str) -> tuple[float, ...]:
    """The α grid the demo searches for a merge method: seven points each.

    Task arithmetic sums N vectors, so its best α is near 1/N: 0-1.5 (quick) or 0-0.6 (full).
    TIES's disjoint merge is a mean of the vectors, not a sum, so its best λ sits near or
    above 1: seven points spanning its reference range 0.8-2.5 (`merge --search-coef`'s
    default for ties, at a coarser step to keep the demo short). TSV-M and Iso-CTS: seven
    points spanning their references' range 0.1-3 (`merge --search-coef`'s default for both,
    ``np.linspace(0, 3, 31)[1:]`` in the references), denser around the references' α = 1.
    """
    if cfg.smoke:
        return (0.0, 0.5, 1.0)
    if method == "ties":
        return (0.8, 1.0, 1.2, 1.5, 1.8, 2.1, 2.5)
    if method in ("tsv", "iso-cts"):
        return (0.2, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0)
    step = 0.25 if cfg.quick else 0.1
    return tuple(round(step * i, 2) for i in range(0, 7))


def _merges_searched(cfg: DemoConfig, stages: _Stages, mode: str, methods: list[str],
                     paths: list[str], tasks: list[str], log: Logger) -> dict[str, Any]:
    """Every merge method of one mode, each α searched on the validation splits.

    One evaluator serves all methods (``measure_merges``): the zero-shot and fine-tuned
    references and the opened splits are shared; each merge is then written at its α.
    """
    from tvtool.evaluate import EvalSettings
    from tvtool.merge import MergeConfig
    from tvtool.workflows.merge_search import measure_merges, merge_searched

    grids = [demo_grid(cfg, method) for method in methods]
    key = _key("merges", methods, [_file_key(p) for p in paths], grids, cfg.eval_limit,
               cfg.seed)
    configs = [MergeConfig(vectors=tuple(paths), method=method, output=str(
        stages.root / "vectors" / f"merged-{mode}-{method}-{key}.safetensors"))
        for method in methods]

    def compute() -> dict[str, Any]:
        settings = EvalSettings(base=cfg.base, device=cfg.device, limit=cfg.eval_limit,
                                seed=cfg.seed)
        measured = measure_merges(configs, grids, settings, datasets=tasks, log=log,
                                  progress=stages.progress)
        found = {}
        for config, grid, search, test in zip(configs, grids, measured.searches,
                                              measured.tests, strict=True):
            merge_searched(config, search, measured.datasets, settings, log)
            found[config.method] = {"coef": search.best, "accuracy": dict(test),
                                    "output": config.output, "grid": list(grid),
                                    "grid_edge": search.grid_edge}
        return found

    return stages.cached_json("merge", key, compute)  # type: ignore[no-any-return]


def _atlas(cfg: DemoConfig, stages: _Stages, mode: str, objective: str, paths: list[str],
           tasks: list[str], eval_accs: Callable[..., dict[str, float]], log: Logger
           ) -> dict[str, Any]:
    from tvtool.atlas.learner import LearnerConfig
    from tvtool.demo.histogram import histogram_check
    from tvtool.io import open_tensors
    from tvtool.workflows.learn_coeffs import LearnCoeffsConfig, learn_coeffs

    labelled = objective == "ce"
    # Few-shot: tvtool's protocol (held-out selection), 80 steps (30 quick). Unlabelled: the
    # objective's default protocol with its defaults (for ufm, aTLAS' learn_ufm.py: 10 epochs
    # of batch 128, lr 1e-3, every example trusted, the epoch kept by accuracy on the labelled
    # val split, as the reference does). One difference, for this world: augmentation is
    # open_clip's mild training crop ("train", what the world's fine-tunes used) rather than
    # the references' 50-100 % crop and horizontal flip, which change the label of the
    # position, digit, count and size tasks.
    protocol = FEWSHOT_PROTOCOL if labelled else None
    steps = 4 if cfg.smoke else (30 if cfg.quick else 80) if labelled else None
    # (ufm's reference trusted set needs at least 10 examples per class)
    shots = (4 if cfg.smoke else 16) if labelled else (10 if cfg.smoke else 32)
    # The val-split selection reads the demo's evaluation subset (the whole split otherwise).
    eval_limit = None if labelled else (32 if cfg.smoke else cfg.eval_limit)
    key = _key("atlas", objective, [_file_key(p) for p in paths], protocol, steps, shots,
               eval_limit, "train", cfg.seed)
    coefs = str(stages.root / "vectors" / f"atlas-{mode}-{objective}-{key}.safetensors")
    merged = str(stages.root / "vectors" / f"atlas-{mode}-{objective}-{key}-merged.safetensors")

    def compute() -> dict[str, Any]:
        learner = LearnerConfig(objective=objective, protocol=protocol, steps=steps,
                                augment="train", seed=cfg.seed)
        result = learn_coeffs(LearnCoeffsConfig(
            vectors=tuple(paths), base=cfg.base, output=coefs, datasets=tuple(tasks),
            learner=learner, granularity="tensor", shots=shots,
            split="train" if labelled else "test", device=cfg.device, merged_out=merged,
            eval_limit=eval_limit), log=log, progress=stages.progress).as_json()
        return {"protocol": result["protocol"], "selection": result["selection"],
                "best_step": result["best_step"], "steps_run": result["steps_run"],
                "histogram": histogram_check(result, tasks)}

    learned = stages.cached_json("atlas", key, compute)
    if not (Path(coefs).is_file() and Path(merged).is_file()):
        # A cache entry without its files (deleted by hand): learn again.
        remove_file(str(stages.cache / f"atlas-{key}.json"))
        learned = stages.cached_json("atlas", key, compute)
    source = open_tensors(merged)
    try:
        kind = source.metadata.get("tvtool.kind")
    finally:
        source.close()
    accuracy = eval_accs(base=merged) if kind == "checkpoint" else eval_accs((merged,))
    return {"coef": None, "accuracy": accuracy, "objective": objective, "output": coefs,
            **learned}


def _negate(cfg: DemoConfig, stages: _Stages, mode: str, vector: str, target: str,
            control: str, log: Logger) -> dict[str, Any]:
    from tvtool.commands.negate import NegateConfig, negate
    from tvtool.evaluate import EvalSettings
    from tvtool.workflows.negation import measure_negation

    # `negate --search`'s default grid
    grid = (0.5, 1.0) if cfg.smoke else tuple(round(0.05 * i, 2) for i in range(1, 21))
    key = _key("negate", _file_key(vector), target, control, grid, cfg.eval_limit, cfg.seed)
    output = str(stages.root / "vectors" / f"negated-{mode}-{key}.safetensors")

    def compute() -> dict[str, Any]:
        settings = EvalSettings(base=cfg.base, device=cfg.device, limit=cfg.eval_limit,
                                seed=cfg.seed)
        # An infeasible grid is a result too: report the smallest α rather than fail.
        measured = measure_negation(settings, vector, grid, target=target, control=control,
                                    fallback=min(grid), log=log, progress=stages.progress)
        search, coef = measured.search, measured.coef
        base_test, negated_test = measured.test["base"], measured.test["negated"]
        negate(NegateConfig(vector=vector, output=output, coef=coef))
        return {"mode": mode, "target": target, "control": control, "coef": coef,
                "feasible": search.best is not None, "threshold": search.threshold,
                "base": {"target": base_test[target], "control": base_test[control]},
                "negated": {"target": negated_test[target], "control": negated_test[control]},
                "output": output}

    return stages.cached_json("negate", key, compute)  # type: ignore[no-any-return]


def _disentangle(cfg: DemoConfig, stages: _Stages, mode: str, first: str, second: str,
                 task1: str, task2: str) -> dict[str, Any]:
    from tvtool.evaluate import (
        DisentanglementConfig,
        EvalSettings,
        disentanglement,
        render_heatmap,
    )

    alphas = ((-1.0, 0.0, 1.0) if cfg.smoke else (-2.0, -1.0, 0.0, 1.0, 2.0) if cfg.quick
              else (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0))
    limit = 32 if cfg.smoke else 100 if cfg.quick else 200
    key = _key("dis", _file_key(first), _file_key(second), alphas, limit, cfg.seed)

    def compute() -> dict[str, Any]:
        settings = EvalSettings(base=cfg.base, device=cfg.device, limit=limit, seed=cfg.seed)
        rep = disentanglement(DisentanglementConfig(
            settings, vectors=(first, second), datasets=(task1, task2), alphas=alphas),
            progress=stages.progress)
        flat = [v for row in rep.error for v in row]
        png = render_heatmap(rep, title=f"disentanglement error ({mode})")
        return {"alphas": rep.alphas, "error": rep.error, "mean_error": sum(flat) / len(flat),
                "png_hex": png.hex()}

    return dict(stages.cached_json("dis", key, compute))
