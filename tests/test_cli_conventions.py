"""CLI conventions: shell completion, option groups in --help, choices shown as choices."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    # rich wraps and truncates option tables to the terminal; make it wide enough.
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")


def _help(cli, *command: str) -> str:
    result = cli([*command, "--help"])
    assert result.exit_code == 0, result.stderr
    return " ".join(result.stdout.split())


def test_shell_completion_is_offered(cli, monkeypatch):
    text = _help(cli)
    assert "--install-completion" in text and "--show-completion" in text
    # typer detects the shell from the process tree (shellingham), which a test run started
    # outside a shell (a CI runner, a background job) does not have: name it.
    import typer.completion

    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    script = cli(["--show-completion"])
    assert script.exit_code == 0
    assert "_tvtool_completion" in script.stdout and "complete" in script.stdout


@pytest.mark.parametrize(("command", "panels", "choices"), [
    (("finetune",), ["Model and data", "Optimisation", "Resumable runs", "LoRA modes"],
     ["[full|attn|linear|lora|llora|llora-net]", "[auto|fp32|bf16|fp16]",
      "[q,k,v,o,mlp,attn]"]),
    (("learn-coeffs",), ["Model and data", "Objective and blocks", "Optimisation", "Output"],
     ["[ce|entropy|infomax|ufm|negation]", "[task|tensor|layer|random:K|atlas:K]",
      "[adamerging|atlas|tvtool]", "[fp32|bf16|fp16]"]),
])
def test_long_commands_group_their_options(cli, command, panels, choices):
    text = _help(cli, *command)
    for panel in panels:
        assert f"─ {panel} ─" in text
    for choice in choices:
        assert choice in text


def test_choices_are_still_checked_by_tvtool(cli, tmp_path):
    result = cli(["finetune", "-b", "tvtool-tiny", "-d", "synthetic:shape", "--mode", "nope",
                  "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "unknown fine-tuning mode" in result.stderr


def test_tables_print_undefined_accuracies_as_a_dash():
    # One formatter for every table (eval, merge --search-coef, negate --search): None and NaN
    # (a normalized accuracy whose reference is 0) are undefined, not "nan".
    from tvtool.cli.common import percent

    assert percent(0.123456) == "12.35"
    assert percent(None) == "–" and percent(float("nan")) == "–"
