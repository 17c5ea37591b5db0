"""The package import graph stays layered (measured by scripts/import_graph.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("_tvtool_import_graph", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        return module.measure()
    finally:
        sys.modules.pop(spec.name, None)


def test_no_cycles_and_no_function_level_import_dodging_one(report):
    assert report["cycles"] == []
    assert report["function_level_imports_dodging_a_cycle"] == []


def test_the_graph_gets_no_deeper(report):
    # 13 before issue 12; 10 once the searches and learn-coeffs leave merge/ and coeffs/.
    assert report["depth"] <= 11, report["longest_chain"]


def test_every_package_has_a_layer_and_only_the_workflows_import_upward(report):
    assert report["unplaced_units"] == []
    upward = {line.split(":")[0] for line in report["upward_imports"]}
    assert upward <= {"tvtool.merge.evaluation", "tvtool.coeffs.run"}
