"""Settings declared once: merge methods and fine-tuning modes drive --help and the docs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tvtool.finetune import MODES
from tvtool.merge import METHODS

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    # rich wraps and truncates option tables to the terminal; make it wide enough.
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")


def _rows(text: str, header: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _doc_default(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`" if isinstance(value, str) else str(value)


def test_docs_methods_table_lists_exactly_the_registered_methods():
    rows = _rows((DOCS / "merge.md").read_text(encoding="utf-8"), "| `--method` |")
    assert [_names(row[0])[0] for row in rows] == list(METHODS)


def test_docs_parameter_table_matches_each_methods_params_dataclass():
    rows = _rows((DOCS / "merge.md").read_text(encoding="utf-8"), "| method | parameter |")
    documented: dict[str, dict[str, str]] = {}
    method = ""
    for row in rows:
        method = _names(row[0])[0] if row[0] else method
        names = _names(row[1])
        defaults = [d.strip() for d in row[2].split(",")] if len(names) > 1 else [row[2]]
        documented.setdefault(method, {}).update(zip(names, defaults, strict=True))
    declared = {name: {f.name: _doc_default(f.default) for f in dataclasses.fields(m.params)}
                for name, m in METHODS.items() if dataclasses.fields(m.params)}
    assert documented == declared


def test_merge_help_lists_the_registry(cli, monkeypatch):
    # Wide enough that rich wraps no cell (the --method choices alone are ~90 columns).
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setenv("TERMINAL_WIDTH", "400")
    result = cli(["merge", "--help"])
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    names = list(METHODS)
    assert f"{', '.join(names[:-1])} or {names[-1]} (docs/merge.md)." in text
    with_density = [n for n, m in METHODS.items()
                    if "density" in {f.name for f in dataclasses.fields(m.params)}]
    assert f"{'/'.join(with_density)}: fraction of entries kept." in text


def test_finetune_help_has_every_flag_the_modes_declare(cli):
    result = cli(["finetune", "--help"])
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    for mode in MODES.values():
        for option in mode.cli_options:
            assert option.flag in text and option.help in text


def test_finetune_help_lists_the_registered_modes(cli):
    result = cli(["finetune", "--help"])
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "[full|attn|linear|lora|llora|llora-net]" in text
    assert "full, attn, linear, lora, llora (L-LoRA) or llora-net." in text
    assert "Also write the fine-tuned model as a checkpoint (full, attn, lora, llora)." in text


def test_finetune_mode_help_follows_the_registry(monkeypatch):
    # What a mode added to the registry (or removed from it) changes: nothing in cli/.
    from tvtool.cli import finetune as finetune_cli
    from tvtool.metadata import Mode

    kept = {mode: MODES[mode] for mode in (Mode.FULL, Mode.LINEAR, Mode.LLORA)}
    monkeypatch.setattr("tvtool.finetune.MODES", kept)
    assert finetune_cli._mode_metavar() == {"mode": "[full|linear|llora]"}
    assert finetune_cli._mode_help() == {
        "mode": "full, linear or llora (L-LoRA).",
        "checkpoint_out": "Also write the fine-tuned model as a checkpoint (full, llora)."}


def test_mode_flags_reach_the_mode_options(cli, tmp_path):
    # An invalid value of a mode's flag is refused by the mode's options dataclass.
    result = cli(["finetune", "-b", "tvtool-tiny:random", "-d", "synthetic:shape",
                  "--mode", "lora", "--lora-rank", "0", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--lora-rank must be at least 1" in result.stderr
    # ... and ignored for a mode that has no such option, as before.
    result = cli(["finetune", "-b", "tvtool-tiny:random", "-d", "synthetic:shape",
                  "--mode", "full", "--lora-rank", "0", "--steps", "0",
                  "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "--steps must be at least 1" in result.stderr


def test_merge_flags_and_config_files_share_one_validation(cli, tmp_path):
    # The same value refused on the command line and in a config file, with the same message.
    flag = cli(["merge", "a.safetensors", "--mixed-modes-as", "both", "-o", "o.safetensors"])
    config = tmp_path / "c.yaml"
    config.write_text("vectors: [a.safetensors]\nmixed_modes_as: both\noutput: o.safetensors\n")
    document = cli(["merge", "--config", str(config)])
    message = "'mixed_modes_as' (--mixed-modes-as) must be null or one of"
    for result in (flag, document):
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
    flag = cli(["merge", "a.safetensors", "-m", "ties", "-p", "density=2", "-o", "o"])
    config.write_text("vectors: [a.safetensors]\nmethod: ties\nparams: {density: 2}\n"
                      "output: o\n")
    document = cli(["merge", "--config", str(config)])
    for result in (flag, document):
        assert result.exit_code == 2 and "density must be in [0, 1]" in result.stderr
