"""Coefficient searches at the ends of their grids, --coef-grid auto, and negation at chance.

The searches are written against ``evaluate(α)`` callables, so the pure tests use fake
evaluators whose optimum is known in closed form; the expected choice is recomputed here by
brute force over the grid, never read back from tvtool. The CLI tests replace the evaluator's
accuracies the same way, on the real command with the tiny model.
"""

from __future__ import annotations

import json
import math

import pytest

from tvtool.errors import UsageError
from tvtool.grid import MAX_EXTENSIONS, AutoGrid, extend_search, grid_edge, parse_grid
from tvtool.workflows.merge_search import search_coef
from tvtool.workflows.negation import search_negation


def hill(peak: float, datasets=("a", "b")):
    """Accuracy 0.9 - |α - peak| on every dataset, and the list of α evaluated."""
    calls: list[float] = []

    def evaluate(alpha: float) -> dict[str, float]:
        calls.append(alpha)
        return {name: 0.9 - abs(alpha - peak) for name in datasets}

    return evaluate, calls


def brute_best(peak: float, values) -> float:
    """The α of ``values`` with the highest score, the smallest among equals."""
    return min(sorted(values), key=lambda a: (abs(a - peak), a))


def steps(start: float, stop: float, step: float) -> list[float]:
    count = round((stop - start) / step) + 1
    return [round(start + i * step, 10) for i in range(count)]


# ---------------------------------------------------------------- grid_edge


@pytest.mark.parametrize(("best", "grid", "edge"), [
    (0.0, [0.0, 0.5, 1.0], "low"), (1.0, [0.0, 0.5, 1.0], "high"), (0.5, [0.0, 0.5, 1.0], None),
    (0.0, [1.0, 0.0, 0.5], "low"), (1.0, [1.0, 0.0, 0.5], "high"),  # a list in any order
    (0.5, [0.5], None), (0.5, [0.5, 0.5], None),  # one value: nothing was searched
    (None, [0.0, 1.0], None),
])
def test_grid_edge(best, grid, edge):
    assert grid_edge(best, grid) == edge


# ---------------------------------------------------------------- merge search


@pytest.mark.parametrize("peak", [-0.4, 0.0, 0.35, 1.0, 1.7])
def test_merge_search_marks_an_optimum_at_an_end_of_a_fixed_grid(peak):
    grid = parse_grid("0:1:0.1")
    evaluate, calls = hill(peak)
    result = search_coef(evaluate, grid, references={"a": 0.9, "b": 0.9})
    expected = brute_best(peak, grid)
    assert result.best == pytest.approx(expected)
    edge = "low" if expected == min(grid) else "high" if expected == max(grid) else None
    assert result.grid_edge == edge and result.extensions == 0
    document = result.as_json()
    assert document["at_grid_edge"] is (edge is not None) and document["grid_edge"] == edge
    assert calls == list(grid)  # a fixed grid: evaluated once each, in its order


def test_auto_grid_extends_past_the_high_end_until_the_optimum_is_interior():
    evaluate, calls = hill(2.3)
    result = search_coef(evaluate, AutoGrid(parse_grid("0:1:0.1"), floor=0.0),
                         references={"a": 0.9, "b": 0.9})
    # 0..1 puts the best at 1.0; +1.1..2.0 at 2.0; +2.1..3.0 has 2.3 inside.
    searched = steps(0.0, 3.0, 0.1)
    assert [p.coef for p in result.points] == pytest.approx(searched)
    assert result.best == pytest.approx(brute_best(2.3, searched))
    assert result.extensions == 2 and result.grid_edge is None
    assert len(calls) == len(set(calls)) == len(searched)  # each α evaluated once


def test_auto_grid_extends_downwards_but_never_below_its_floor():
    evaluate, _ = hill(0.3)
    # TIES' default grid starts at 0.8; below it the optimum 0.3 is found, and the
    # extension (width 1.7) stops at the floor 0.
    result = search_coef(evaluate, AutoGrid(parse_grid("0.8:2.5:0.1"), floor=0.0))
    assert [p.coef for p in result.points] == pytest.approx(steps(0.0, 2.5, 0.1))
    assert result.best == pytest.approx(0.3) and result.extensions == 1
    stuck = search_coef(hill(-1.0)[0], AutoGrid(parse_grid("0:1:0.1"), floor=0.0))
    assert stuck.best == 0.0 and stuck.grid_edge == "low" and stuck.extensions == 0


def test_auto_grid_is_bounded():
    evaluate, calls = hill(100.0)
    result = search_coef(evaluate, AutoGrid(parse_grid("0:1:0.25"), floor=0.0))
    # Each extension adds the start grid's width (1.0): after the bound, 0..1+MAX_EXTENSIONS.
    assert max(p.coef for p in result.points) == pytest.approx(1.0 + MAX_EXTENSIONS)
    assert result.extensions == MAX_EXTENSIONS and result.grid_edge == "high"
    assert len(calls) == 4 * (MAX_EXTENSIONS + 1) + 1


def test_extend_search_follows_a_list_grid_spacing_at_each_end():
    grid = AutoGrid((0.5, 1.0, 2.0), floor=None)  # steps 0.5 (low end) and 1.0 (high end)
    assert grid.extension([0.5, 1.0, 2.0], "high") == (3.0, 4.0)
    assert grid.extension([0.5, 1.0, 2.0], "low") == (0.0, -0.5)
    positive = AutoGrid((0.05, 0.1), floor=0.0, strict_floor=True)
    assert positive.extension([0.05, 0.1], "low") == ()
    with pytest.raises(UsageError):
        AutoGrid((1.0,))
    seen: list[tuple[float, ...]] = []
    _, extensions = extend_search((0.2, 0.1), lambda values: seen.append(values) or 0.2,
                                  lambda best: best)
    assert seen == [(0.2, 0.1)] and extensions == 0  # fixed grids are searched as given


# ---------------------------------------------------------------- negation search


def negation_world(slope: float, target0: float = 0.8, control0: float = 0.6,
                   control_drop: float = 0.0):
    def evaluate(alpha: float) -> dict[str, float]:
        return {"t": max(0.0, target0 - slope * alpha), "c": control0 - control_drop * alpha}

    return evaluate


def brute_negation(evaluate, values, threshold=0.95):
    base = evaluate(0.0)
    feasible = [a for a in values if evaluate(a)["c"] >= threshold * base["c"] - 1e-12]
    lowest = min(evaluate(a)["t"] for a in feasible)
    return max(a for a in feasible if evaluate(a)["t"] == lowest)


def test_negation_marks_an_end_of_the_grid_and_auto_extends_it():
    # control = 0.6 - 0.01875 α stays >= 95 % of 0.6 up to α = 1.6.
    evaluate = negation_world(0.4, control_drop=0.01875)
    grid = parse_grid("0.05:1:0.05")
    fixed = search_negation(evaluate, grid, target="t", control="c")
    assert fixed.best == pytest.approx(brute_negation(evaluate, grid)) == pytest.approx(1.0)
    assert fixed.grid_edge == "high" and fixed.as_json()["at_grid_edge"] is True
    auto = search_negation(evaluate, AutoGrid(grid, floor=0.0, strict_floor=True),
                           target="t", control="c")
    values = [p.coef for p in auto.points]
    # The start grid spans 19 steps (0.95): one extension adds 1.05..1.95.
    assert values == pytest.approx(steps(0.05, 1.95, 0.05))
    assert auto.best == pytest.approx(brute_negation(evaluate, values))
    assert auto.best == pytest.approx(1.6) and auto.grid_edge is None and auto.extensions == 1


@pytest.mark.parametrize(("base_target", "at_chance"), [(0.05, True), (0.10, True),
                                                        (0.125, True), (0.13, False)])
def test_negation_flags_a_target_already_at_chance(base_target, at_chance):
    # Ten classes, 500 examples: chance 0.1, two standard errors 2·sqrt(0.1·0.9/500) ≈ 0.0268.
    margin = 2 * math.sqrt(0.1 * 0.9 / 500)
    result = search_negation(negation_world(0.0, target0=base_target), [0.5, 1.0], target="t",
                             control="c", chance=0.1, examples=500)
    assert result.chance_margin == pytest.approx(margin)
    assert result.target_at_chance is at_chance
    assert result.as_json()["target_at_chance"] is at_chance
    unchecked = search_negation(negation_world(0.0, target0=base_target), [0.5, 1.0],
                                target="t", control="c")
    assert unchecked.target_at_chance is False and unchecked.as_json()["chance"] is None


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_state):
    """A random tiny base and two vectors recorded for two synthetic datasets."""
    from tests.conftest import perturbed
    from tvtool.commands.extract import ExtractConfig, extract
    from tvtool.io import write_tensors
    from tvtool.metadata import FileMeta, Kind

    root = tmp_path_factory.mktemp("edges")
    header = FileMeta(kind=Kind.CHECKPOINT, architecture="tvtool-tiny").to_header()
    base = root / "base.safetensors"
    write_tensors(str(base), tiny_state, header)
    paths = {"base": str(base)}
    for index, dataset in ((1, "synthetic:shape"), (2, "synthetic:color")):
        ft = root / f"ft{index}.safetensors"
        write_tensors(str(ft), perturbed(tiny_state, index, scale=0.05), header)
        paths[f"tv{index}"] = str(root / f"tv{index}.safetensors")
        extract(ExtractConfig(base=str(base), finetuned=str(ft), output=paths[f"tv{index}"],
                              dataset=dataset, keep="changed"))
    return paths


EVAL = ["--limit", "4", "--batch-size", "8", "--device", "cpu"]


def _fake_accuracies(monkeypatch, accuracy):
    """Replace the evaluator's accuracies by ``accuracy(coefs, dataset)``."""
    from tvtool.workflows.evaluator import Evaluator

    def accuracies(self, coefs, split="val", datasets=None):
        names = [n for n in self.datasets if datasets is None or n in datasets]
        return {name: accuracy(list(coefs), name) for name in names}

    monkeypatch.setattr(Evaluator, "accuracies", accuracies)


def test_merge_search_cli_warns_and_marks_the_edge(cli, world, tmp_path, monkeypatch):
    # Fine-tuned (one-hot) 0.9; the merged model (last coefficient α) peaks at α = 3.
    _fake_accuracies(monkeypatch, lambda coefs, name: 0.9 if sum(coefs[:-1]) else
                     0.5 - abs(coefs[-1] - 3.0) / 10)
    out = tmp_path / "m.safetensors"
    args = ["merge", world["tv1"], world["tv2"], "--search-coef", "--base", world["base"],
            *EVAL, "-o", str(out), "--json"]
    fixed = cli([*args, "--coef-grid", "0:1:0.25"])
    assert fixed.exit_code == 0, fixed.stderr
    report = json.loads(fixed.stdout)
    assert report["best_coef"] == 1.0 and report["at_grid_edge"] is True
    assert report["grid_edge"] == "high" and report["grid_extensions"] == 0
    assert "warning: the chosen α = 1 is the highest value" in fixed.stderr
    assert "--coef-grid auto" in fixed.stderr
    auto = cli([*args, "--coef-grid", "auto"])
    assert auto.exit_code == 0, auto.stderr
    report = json.loads(auto.stdout)
    # task arithmetic's grid 0:1:0.05 grows by 1.0 twice: 3.0 lies inside 0..3, at its end;
    # a third extension puts it inside.
    assert report["best_coef"] == pytest.approx(3.0) and report["at_grid_edge"] is False
    assert report["grid_extensions"] == 3
    assert max(p["coef"] for p in report["val"]["grid"]) == pytest.approx(4.0)
    assert "warning" not in auto.stderr
    from tests.conftest import load

    merged, vectors = load(str(out)), (load(world["tv1"]), load(world["tv2"]))
    name = next(iter(merged))
    assert (merged[name] - 3.0 * (vectors[0][name] + vectors[1][name])).abs().max() < 1e-5


def test_merge_search_cli_interior_optimum_has_no_warning(cli, world, tmp_path, monkeypatch):
    _fake_accuracies(monkeypatch, lambda coefs, name: 0.9 if sum(coefs[:-1]) else
                     0.5 - abs(coefs[-1] - 0.5) / 10)
    result = cli(["merge", world["tv1"], world["tv2"], "--search-coef", "--base", world["base"],
                  "--coef-grid", "0,0.25,0.5,0.75", *EVAL, "-o", str(tmp_path / "m"),
                  "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["best_coef"] == 0.5 and report["at_grid_edge"] is False
    assert "warning" not in result.stderr


def test_negate_search_cli_flags_a_target_at_chance(cli, world, tmp_path, monkeypatch):
    # synthetic:shape has 6 classes: a target at 1/6 whatever α is noise to choose among.
    _fake_accuracies(monkeypatch, lambda coefs, name: 1 / 6 if name == "synthetic:shape"
                     else 0.8)
    out = tmp_path / "neg.safetensors"
    result = cli(["negate", world["tv1"], "--search", "--base", world["base"], "--control",
                  "synthetic:color", "--coef-grid", "0.5,1", *EVAL, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["target_at_chance"] is True and report["val"]["chance"] == pytest.approx(1 / 6)
    assert report["val"]["chance_margin"] == pytest.approx(2 * math.sqrt(1 / 6 * 5 / 6 / 4))
    assert "already at chance on synthetic:shape" in result.stderr
    # Every α ties: the largest is chosen, the end of the grid, and that is said too.
    assert report["best_coef"] == 1.0 and report["at_grid_edge"] is True
    assert "highest value of the searched grid" in result.stderr


def test_negate_search_cli_auto_grid(cli, world, tmp_path, monkeypatch):
    # Target falls with α; control keeps 95 % of 0.8 up to α = 1.6.
    _fake_accuracies(monkeypatch, lambda coefs, name: max(0.0, 0.9 + 0.4 * coefs[0])
                     if name == "synthetic:shape" else 0.8 + 0.025 * coefs[0])
    result = cli(["negate", world["tv1"], "--search", "--base", world["base"], "--control",
                  "synthetic:color", "--coef-grid", "auto", *EVAL, "-o",
                  str(tmp_path / "n.safetensors"), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["best_coef"] == pytest.approx(1.6) and report["at_grid_edge"] is False
    assert report["val"]["grid_extensions"] == 1 and report["target_at_chance"] is False
