"""One grammar across commands (issue 25 §2): the options of every command, walked.

The walk fails on a new inconsistency: one long name with different short flags (or a short
flag on one command only), one short flag for different long names, a free value shown as
``<str>`` or a flag as ``<bool>``, a hidden default, a hidden option that is no deprecated
alias, choices that differ from the library's.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from tvtool.cli.common import fit_hint


def _commands():
    """(path, command, context) for every command of the CLI, groups included."""
    from tvtool.cli.app import click_command

    out = []

    def walk(command, path):
        ctx = command.context_class(command, info_name=path.split()[-1])
        out.append((path, command, ctx))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, f"{path} {name}")

    walk(click_command(), "tvtool")
    return out


def _options(include_hidden: bool = False):
    for path, command, ctx in _commands():
        for param in command.get_params(ctx):
            if param.param_type_name != "option" or "--help" in param.opts:
                continue
            if param.hidden and not include_hidden:
                continue
            yield path, param, ctx


def _long(param) -> str:
    return next(o for o in param.opts if o.startswith("--"))


def _shorts(param) -> tuple[str, ...]:
    return tuple(sorted(o for o in param.opts if not o.startswith("--")))


def test_one_long_name_has_one_short_flag_everywhere():
    shorts: dict[str, dict[tuple[str, ...], list[str]]] = defaultdict(lambda: defaultdict(list))
    for path, param, _ in _options():
        shorts[_long(param)][_shorts(param)].append(path)
    # The root's --version is no command option; `eval`'s options are the group's own.
    mixed = {name: dict(found) for name, found in shorts.items() if len(found) > 1}
    assert not mixed, f"the same option has different short flags: {mixed}"


def test_one_short_flag_means_one_long_name():
    longs: dict[str, set[str]] = defaultdict(set)
    for _, param, _ in _options():
        for short in _shorts(param):
            longs[short].add(_long(param))
    assert {s: names for s, names in longs.items() if len(names) > 1} == {}


def test_dataset_has_d_wherever_it_exists():
    having = [path for path, param, _ in _options() if _long(param) == "--dataset"]
    assert "tvtool extract" in having and "tvtool convert" in having
    for path, param, _ in _options():
        if _long(param) == "--dataset":
            assert _shorts(param) == ("-d",), path
        if _long(param) == "--output":
            assert _shorts(param) == ("-o",), path


def test_no_free_string_or_bool_metavar_is_shown():
    bad = []
    for path, param, ctx in _options():
        shown = param.display_type_rich(ctx) if hasattr(param, "display_type_rich") else ""
        if param.is_flag and shown:
            bad.append((path, _long(param), shown))
        if shown in ("<str>", "<list[str]>", "<bool>"):
            bad.append((path, _long(param), shown))
    assert bad == []


def test_defaults_are_shown():
    hidden = [(path, _long(param)) for path, param, _ in _options()
              if not param.is_flag and param.default is not None and not param.show_default]
    assert hidden == []
    # --coef's default, 1, is shown wherever it is taken (it used to be left blank).
    coefs = {path: param.default for path, param, _ in _options() if _long(param) == "--coef"}
    assert coefs == {"tvtool apply": (1.0,), "tvtool eval": (1.0,), "tvtool merge": (1.0,),
                     "tvtool negate": 1.0}


def test_every_hidden_option_is_a_deprecated_alias_of_an_existing_one():
    aliases = {}
    for path, param, ctx in _options(include_hidden=True):
        if param.hidden:
            assert param.help.startswith("Deprecated spelling of "), (path, param.opts)
            new = param.help.removeprefix("Deprecated spelling of ").rstrip(".")
            visible = {o for p in param_list(ctx) if not p.hidden for o in p.opts}
            assert new in visible, (path, new)
            aliases[(path, _long(param))] = new
    assert aliases == {
        ("tvtool demo", "--out"): "--output",
        ("tvtool eval", "--out"): "--output",
        ("tvtool eval disentanglement", "--grid"): "--coef-grid",
        ("tvtool negate", "--threshold"): "--control-threshold",
        ("tvtool pretrain", "--batch"): "--batch-size",
    }


def param_list(ctx):
    return ctx.command.get_params(ctx)


def _metavar(path: str, flag: str) -> list[str]:
    for p, param, ctx in _options():
        if p == path and flag in param.opts:
            text = param.display_type_rich(ctx)
            assert text.startswith("[") and text.endswith("]"), (path, flag, text)
            return text[1:-1].split("|")
    raise AssertionError(f"{path} has no {flag}")


def test_choices_shown_are_the_library_choices():
    from tvtool.finetune import MODES
    from tvtool.merge.config import MIXED_MODES
    from tvtool.merge.method import TRIM_SCOPES
    from tvtool.merge.registry import METHODS
    from tvtool.metadata import Mode
    from tvtool.models import EMBEDDED_MODELS
    from tvtool.vectors.streaming import KEEP_CHOICES

    assert _metavar("tvtool extract", "--mode") == [
        m.value for m in Mode if not m.linearized and not m.factored]
    assert _metavar("tvtool extract", "--keep") == list(KEEP_CHOICES)
    assert _metavar("tvtool merge", "--method") == list(METHODS)
    assert _metavar("tvtool merge", "--trim") == list(TRIM_SCOPES)
    assert _metavar("tvtool merge", "--mixed-modes-as") == list(MIXED_MODES)
    assert _metavar("tvtool pretrain", "--model") == list(EMBEDDED_MODELS)
    assert _metavar("tvtool eval", "--split") == ["val", "test"]
    assert _metavar("tvtool eval disentanglement", "--split") == ["val", "test"]
    assert _metavar("tvtool finetune", "--mode") == [m.value for m in MODES]
    from tvtool.finetune.config import RESUME_CHOICES
    from tvtool.merge.config import DTYPES

    assert _metavar("tvtool merge", "--dtype") == list(DTYPES)

    assert _metavar("tvtool finetune", "--resume") == list(RESUME_CHOICES)
    assert _metavar("tvtool pretrain", "--resume") == list(RESUME_CHOICES)


def test_help_shows_no_bool_and_lists_choices(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    for command in (["extract"], ["merge"], ["eval"], ["pretrain"], ["demo"]):
        options = [line for line in cli([*command, "--help"]).stdout.splitlines()
                   if " --" in line]
        assert options and not [line for line in options
                                if "<bool>" in line or "<str>" in line], command
    text = cli(["extract", "--help"]).stdout
    assert "[full|attn]" in text and "[image|all|changed]" in text
    assert "[default: 1.0]" in cli(["apply", "--help"]).stdout


# ---------------------------------------------------------------- deprecated spellings


def _parse(args):
    """The context of the (sub)command ``args`` names, parsed for real (callbacks run)."""
    from tvtool.cli.app import click_command

    command = click_command()
    ctx = command.make_context("tvtool", list(args))
    while getattr(command, "commands", None) and (ctx._protected_args or ctx.args):
        name, command, rest = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


@pytest.mark.parametrize(("args", "name", "alias", "value"), [
    (["negate", "v.safetensors", "-o", "x", "--threshold", "0.5"], "control_threshold",
     "threshold", 0.5),
    (["pretrain", "--batch", "8"], "batch", "old_batch", 8),
    (["eval", "-b", "tvtool-tiny", "--out", "r.json"], "output", "out", "r.json"),
    (["demo", "--out", "d"], "output", "out", "d"),
    (["eval", "disentanglement", "-b", "B", "a", "b", "-d", "x", "-d", "y", "--grid", "0,1"],
     "grid", "old_grid", "0,1"),
])
def test_deprecated_spellings_still_work_with_a_note(args, name, alias, value, capsys):
    from tvtool.cli.common import take_alias
    from tvtool.errors import UsageError

    ctx = _parse(args)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is deprecated, use --" in err
    assert take_alias(ctx, name, ctx.params[name], ctx.params[alias]) == value
    new_flag = next(p.opts[0] for p in ctx.command.params if p.name == name)
    both = _parse([*args, new_flag, str(value)])
    with pytest.raises(UsageError, match="given twice"):
        take_alias(both, name, both.params[name], both.params[alias])


def test_a_deprecated_spelling_reaches_the_command(cli, tmp_path):
    # eval --out -: the alias's value is the output the command checks.
    result = cli(["eval", "-b", "tvtool-tiny", "-d", "synthetic:shape", "--out", "-"])
    assert result.exit_code == 2
    assert "--out is deprecated, use --output" in result.stderr
    assert "-o - would mix the report" in result.stderr


def test_pretrain_batch_size_and_its_old_spelling(cli, tmp_path):
    out = tmp_path / "p.safetensors"
    result = cli(["pretrain", "-o", str(out), "--steps", "1", "--batch", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["batch"] == 4
    assert "--batch is deprecated" in result.stderr


# ---------------------------------------------------------------- errors and hints


def test_fit_hint_drops_only_advice_naming_missing_flags():
    hint = ("evaluate them separately, or pass --approximate-linearized to add every vector "
            "to the weights")
    assert fit_hint(hint, {"--base", "--approximate-linearized"}) == hint
    assert fit_hint(hint, {"--base"}) == "evaluate them separately"
    assert fit_hint("pass --approximate-linearized", {"--base"}) is None
    # Advice naming another command stays; alternatives that all exist are untouched.
    assert fit_hint("run `tvtool extract --allow-missing`", {"--base"}) \
        == "run `tvtool extract --allow-missing`"
    assert fit_hint("use --missing-as-zero or --common-only",
                    {"--missing-as-zero", "--common-only"}) \
        == "use --missing-as-zero or --common-only"
    assert fit_hint(None, {"--base"}) is None


def test_learn_coeffs_hint_names_no_flag_it_lacks(cli, files, tmp_path):
    from tvtool.io import open_tensors, write_tensors
    from tvtool.metadata import FileMeta, Mode

    source = open_tensors(files["tv1"])
    meta = FileMeta.from_header(source.metadata, "tv1")
    linear = tmp_path / "lin.safetensors"
    write_tensors(str(linear), {n: source.get(n) for n in source.keys()},
                  meta.with_changes(mode=Mode.LINEAR, linearized=True).to_header())
    source.close()
    result = cli(["learn-coeffs", files["tv2"], str(linear), "-b", files["base"],
                  "-d", "synthetic:shape", "-o", str(tmp_path / "c.safetensors"),
                  "--device", "cpu"])
    assert result.exit_code == 2
    assert "is linearized but" in result.stderr
    assert "--approximate-linearized" not in result.stderr
    # eval has the flag, so its hint keeps it.
    result = cli(["eval", files["tv2"], str(linear), "-b", files["base"],
                  "-d", "synthetic:shape", "--limit", "4", "--device", "cpu"])
    assert result.exit_code == 2 and "--approximate-linearized" in result.stderr


@pytest.mark.parametrize(("variable", "value", "args"), [
    ("TVTOOL_DEVICE", "gpu7", ["eval", "-b", "tvtool-tiny", "-d", "synthetic:shape"]),
    ("TVTOOL_PRECISION", "fp8", ["eval", "-b", "tvtool-tiny", "-d", "synthetic:shape"]),
    ("TVTOOL_MERGE_THREADS", "0", ["merge", "{tv1}", "{tv2}", "-o", "{out}"]),
])
def test_a_value_from_the_environment_is_named(cli, files, tmp_path, monkeypatch, variable,
                                               value, args):
    monkeypatch.setenv(variable, value)
    args = [a.format(tv1=files["tv1"], tv2=files["tv2"], out=tmp_path / "m.safetensors")
            for a in args]
    result = cli(args)
    assert result.exit_code == 2
    assert f"(from the environment: {variable}={value})" in result.stderr
    assert result.stderr.count("\n") == 1
    # The same value on the command line is the user's own: no environment note.
    monkeypatch.delenv(variable)
    flag = {"TVTOOL_DEVICE": "--device", "TVTOOL_PRECISION": "--precision",
            "TVTOOL_MERGE_THREADS": "--threads"}[variable]
    result = cli([*args, flag, value])
    assert result.exit_code == 2 and "from the environment" not in result.stderr


# ---------------------------------------------------------------- the searches


def test_negate_search_takes_several_controls():
    from tvtool.workflows.negation import search_negation

    def evaluate(alpha):
        # control a falls slowly, control b fast: b decides.
        return {"t": 0.9 - 0.8 * alpha, "a": 0.8 - 0.01 * alpha, "b": 0.6 - 0.2 * alpha}

    grid = [0.1, 0.2, 0.3, 0.4]
    result = search_negation(evaluate, grid, target="t", control=["a", "b"], threshold=0.9)
    # Independent rule: every control keeps >= 0.9 x its base accuracy.
    feasible = [g for g in grid if all(evaluate(g)[c] >= 0.9 * evaluate(0.0)[c] - 1e-12
                                       for c in "ab")]
    assert result.best == max(g for g in feasible if evaluate(g)["t"] == min(
        evaluate(f)["t"] for f in feasible))
    assert result.best == pytest.approx(0.3)
    point = result.points[0]
    assert point.controls == pytest.approx({"a": 0.799, "b": 0.58})
    assert point.control_ratio == pytest.approx(min(0.799 / 0.8, 0.58 / 0.6))
    assert result.base_controls == {"a": 0.8, "b": 0.6}
    one = search_negation(evaluate, grid, target="t", control="b", threshold=0.9)
    assert one.best == result.best and one.points[0].control == pytest.approx(0.58)


def test_searches_take_workers():
    import inspect

    from tvtool.cli.merge import merge
    from tvtool.cli.negate import negate

    assert inspect.signature(merge).parameters["workers"].default == 0
    assert inspect.signature(negate).parameters["workers"].default == 0
    assert "control" in inspect.signature(negate).parameters


def test_peft_interop_is_a_command_module_with_a_public_alpha():
    import importlib

    module = importlib.import_module("tvtool.commands.peft_interop")
    assert hasattr(module, "export_peft") and hasattr(module, "convert_peft")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("tvtool.peft_interop")
    from tvtool.formats.lora import lora_alpha_rank

    assert lora_alpha_rank({"tvtool.lora_alpha": "8", "tvtool.lora_rank": "4"}) == (8.0, 4)
