"""Docs that run (issue 25 §7, issue 22 §5): every ``tvtool`` line of README.md and docs/*.md
parses against the real CLI.

Shell blocks (```bash, ```sh, ```shell, ```console) are split into commands as a shell
would (continuations, pipes, ``&&``, ``;``, redirections, comments); each ``tvtool ...``
command is parsed by the real click command tree, callbacks included, without running it.
An unknown command or option, a bad value, an extra argument or a deprecated spelling fails.
Synopsis blocks (plain ````` blocks) are checked for their option names. Parsing only: fast.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTIONS = {">", ">>", "<", "2>", "&>", ">&", "2>&1"}


def _blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, body) of every fenced block."""
    text = path.read_text(encoding="utf-8")
    out = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        out.append((match.group(1), text[:match.start()].count("\n") + 2, match.group(2)))
    return out


def shell_commands(body: str, console: bool = False) -> list[tuple[int, list[str]]]:
    """(line offset, argv) of every tvtool command in a shell block."""
    commands = []
    lines = body.splitlines()
    index = 0
    while index < len(lines):
        start = index
        line = lines[index]
        while line.rstrip().endswith("\\") and index + 1 < len(lines):
            index += 1
            line = line.rstrip()[:-1] + " " + lines[index]
        index += 1
        if console:
            if not line.lstrip().startswith("$ "):
                continue
            line = line.lstrip()[2:]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        current: list[str] = []
        for token in [*tokens, ";"]:
            if token in SEPARATORS:
                argv = _tvtool_argv(current)
                if argv is not None:
                    commands.append((start, argv))
                current = []
            else:
                current.append(token)
    return commands


def _tvtool_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after ``tvtool`` (or ``python -m tvtool``, ``torchrun ... -m tvtool``)."""
    cleaned = []
    skip = False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in REDIRECTIONS or re.fullmatch(r"\d?>+&?\d*", token):
            skip = not token.endswith(("&1", "&2"))
            if cleaned and cleaned[-1] in ("1", "2"):  # "2>": shlex splits off the 2
                cleaned.pop()
            continue
        cleaned.append(token)
    if cleaned[:1] == ["tvtool"]:
        argv = cleaned[1:]
    elif "-m" in cleaned and cleaned[cleaned.index("-m") + 1:cleaned.index("-m") + 2] == [
            "tvtool"]:
        argv = cleaned[cleaned.index("-m") + 2:]
    else:
        return None
    if "..." in argv:  # "the rest as above": parse what is written
        argv = argv[:argv.index("...")]
    return argv


def parse(argv: list[str]) -> None:
    """Parse ``tvtool ARGV`` with the real CLI (callbacks run, the command does not).

    Raises:
        click's exceptions for unknown commands and options, bad values, extra arguments;
        a missing required option is accepted (docs may take it from TVTOOL_BASE and the
        like).
    """
    from tvtool.cli.app import click_command

    command = click_command()
    try:
        ctx = command.make_context("tvtool", list(argv))
        while getattr(command, "commands", None) and (ctx._protected_args or ctx.args):
            name, command, rest = command.resolve_command(ctx, [*ctx._protected_args,
                                                                *ctx.args])
            ctx = command.make_context(name, rest, parent=ctx)
    except Exception as exc:  # by class name: typer may vendor its own click
        kinds = {cls.__name__ for cls in type(exc).__mro__}
        if "MissingParameter" in kinds or "Exit" in kinds:  # --help exits
            return
        raise


def _run_steps(body: str) -> list[str]:
    """The ``run:`` scripts of a CI workflow in a YAML block (GitHub Actions' steps)."""
    import yaml

    try:
        document = yaml.safe_load(body)
    except yaml.YAMLError:
        return []
    scripts: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "run" and isinstance(value, str):
                    scripts.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    return scripts


def _shell_cases():
    for path in DOCS:
        for language, line, body in _blocks(path):
            if language in SHELL:
                for offset, argv in shell_commands(body, console=language == "console"):
                    yield pytest.param(argv, id=f"{path.name}:{line + offset}")
            elif language in ("yaml", "yml"):
                for index, script in enumerate(_run_steps(body)):
                    for _, argv in shell_commands(script):
                        yield pytest.param(argv, id=f"{path.name}:{line}:run{index}")


SHELL_CASES = list(_shell_cases())


def test_the_docs_have_tvtool_commands_to_check():
    assert len(SHELL_CASES) > 40
    names = {case.values[0][0] for case in SHELL_CASES if case.values[0]}
    assert {"finetune", "extract", "merge", "negate", "learn-coeffs", "eval", "apply",
            "inspect", "convert", "export-peft", "pretrain", "demo"} <= names


@pytest.mark.parametrize("argv", SHELL_CASES)
def test_shell_block_commands_parse(argv, monkeypatch, capsys):
    for variable in ("TVTOOL_BASE", "TVTOOL_DEVICE", "TVTOOL_SEED", "TVTOOL_PRECISION",
                     "TVTOOL_MERGE_THREADS", "TVTOOL_WORKDIR", "TVTOOL_DATA_ROOT"):
        monkeypatch.delenv(variable, raising=False)
    parse(argv)
    assert "deprecated" not in capsys.readouterr().err, "the docs use a deprecated spelling"


# ---------------------------------------------------------------- synopses


def synopses(body: str) -> list[str]:
    """Each ``tvtool ...`` synopsis of a plain block, with its indented continuation lines."""
    out: list[str] = []
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith(("tvtool ", "torchrun ")):
            out.append(stripped)
        elif out and out[-1] and line.startswith(" ") and stripped.startswith(("[", "-", "(")):
            out[-1] += " " + stripped
        elif not stripped:
            continue
        else:
            out.append("")  # something else ends the synopsis
    return [s for s in out if s]


def _synopsis_cases():
    for path in DOCS:
        for language, line, body in _blocks(path):
            if language == "":
                for text in synopses(body):
                    yield pytest.param(text, id=f"{path.name}:{line}:{text[:40]}")


@pytest.mark.parametrize("text", list(_synopsis_cases()))
def test_synopsis_options_exist(text):
    from tvtool.cli.app import click_command

    words = text.split()
    if words[0] == "torchrun":
        words = words[words.index("tvtool"):]
    command, index = click_command(), 1
    while index < len(words) and words[index] in getattr(command, "commands", {}):
        command, index = command.commands[words[index]], index + 1
    ctx = command.context_class(command, info_name="tvtool")
    known = {opt for param in command.get_params(ctx) if not param.hidden
             for opt in (*param.opts, *param.secondary_opts)}
    # Sub-commands' options are listed under the group (eval's synopsis names them).
    for sub in getattr(command, "commands", {}).values():
        sub_ctx = sub.context_class(sub, info_name="x")
        known |= {o for p in sub.get_params(sub_ctx) if not p.hidden for o in p.opts}
    rest = " ".join(words[index:])
    flags = re.findall(r"(?<![\w/.-])(--?[a-zA-Z][\w-]*)", rest)
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"{' '.join(words[:index])}: {unknown}"


def test_parse_rejects_what_the_cli_rejects(capsys):
    with pytest.raises(Exception, match="No such option"):
        parse(["extract", "x.safetensors", "--bogus"])
    with pytest.raises(Exception, match="No such command"):
        parse(["extrakt", "x.safetensors"])
    with pytest.raises(Exception, match="unexpected extra argument"):
        parse(["finetune", "-b", "B", "-d", "D", "-o", "o", "[--checkpoint-out", "x]"])
    with pytest.raises(Exception, match="valid"):
        parse(["eval", "-b", "B", "--limit", "ten"])
    parse(["extract", "x.safetensors", "-d", "MNIST", "-o", "o"])  # no --base: from the env
    capsys.readouterr()
    parse(["eval", "-b", "B", "--out", "r.json"])  # a deprecated spelling parses, with a note
    assert "deprecated" in capsys.readouterr().err


def test_shell_splitting():
    commands = shell_commands(
        "tvtool extract a -b B -o - \\\n  | tvtool negate - -o - && echo ok\n"
        "tvtool eval -b B -d D --json > out.json 2>&1   # a comment\n"
        "python -m tvtool inspect x\nmake demo\n")
    assert [argv for _, argv in commands] == [
        ["extract", "a", "-b", "B", "-o", "-"], ["negate", "-", "-o", "-"],
        ["eval", "-b", "B", "-d", "D", "--json"], ["inspect", "x"]]


# ---------------------------------------------------------------- tables that agree


def test_data_md_lists_every_dataset_tvtool_datasets_lists():
    from tvtool.cli.datasets import dataset_listing

    text = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    for entry in dataset_listing():
        assert f"`{entry['name']}`" in text or entry["name"] in text, entry["name"]
    for entry in dataset_listing():
        if entry["kind"] == "synthetic":
            assert f"| `{entry['name']}` |" in text and f"| {entry['classes']} |" in text


def test_datasets_says_which_standard_datasets_cannot_be_downloaded():
    from tvtool.cli.datasets import dataset_listing
    from tvtool.data.standard import STANDARD
    from tvtool.errors import InvalidInputError

    by_name = {e["name"]: e for e in dataset_listing()}
    for info in STANDARD:
        fetched = "--download fetches it" in by_name[info.name]["description"]
        assert fetched == (info.build is not None and info.name != "StanfordCars"), info.name
    # RESISC45 really has no downloader: the library refuses.
    from tvtool.data import download

    with pytest.raises(InvalidInputError, match="no downloader"):
        download("RESISC45", "/nonexistent-root")


def test_readme_command_table_lists_every_command():
    from tvtool.cli.app import click_command

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in click_command().commands:
        assert f"| `tvtool {name}` |" in text, name
