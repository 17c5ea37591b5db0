"""The package import graph stays layered (measured by scripts/import_graph.py)."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.conftest import load_script

MAX_DEPTH = 10


@pytest.fixture(scope="module")
def graph() -> ModuleType:
    return load_script("import_graph")


@pytest.fixture(scope="module")
def report(graph):
    return graph.measure()


def test_no_cycles_and_no_function_level_import_dodging_one(report):
    assert report["cycles"] == []
    assert report["function_level_imports_dodging_a_cycle"] == []


def test_the_graph_gets_no_deeper(report):
    # 13 before issue 12, 11 with the workflows inside merge/ and coeffs/, 10 since:
    # cli -> demo -> workflows -> commands -> data -> synthetic_world -> models -> io -> limits
    # -> errors.
    assert report["depth"] <= MAX_DEPTH, report["longest_chain"]


def test_every_package_has_a_layer_and_none_imports_upward(report):
    assert report["unplaced_units"] == []
    assert report["upward_imports"] == []


def test_methods_import_no_evaluation(graph):
    # The workflows combine methods with evaluation; the methods stay below evaluate.
    targets: dict[str, set[str]] = {}
    for edge in graph.all_edges():
        targets.setdefault(edge.source, set()).add(edge.target)
    assert not targets["merge"] & {"evaluate", "workflows"}
    assert not targets["atlas"] & {"evaluate", "workflows", "merge"}
    layer = {unit: i for i, units in enumerate(graph.LAYERS) for unit in units}
    assert layer["merge"] < layer["evaluate"] < layer["workflows"] < layer["demo"]


def test_negate_command_does_not_reach_into_the_merge_command(graph):
    # Shared CLI helpers live in cli/common.py; the negation search in workflows/negation.py.
    imported = {edge.target_module for edge in graph.all_edges()
                if edge.module == "tvtool.cli.negate"}
    assert "tvtool.cli.merge" not in imported
    assert "tvtool.workflows.negation" in imported


def test_check_mode_passes(graph, capsys):
    assert graph.main(["--check", "--max-depth", str(MAX_DEPTH)]) == 0
    assert "upward imports: 0" in capsys.readouterr().out
