"""Shared pieces of every subcommand: options, error mapping, output conventions.

stdout carries data only (an output path, or one JSON document with ``--json``); logs,
warnings and progress go to stderr.

Command modules import only this module, typer and the standard library at import time;
the library (torch, open_clip, safetensors) is imported inside the command functions, so
``tvtool --help`` and argument errors stay fast.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperOption

from tvtool.errors import TvtoolError, bounded_line, interruption_note
from tvtool.progress import DEFAULT_EVERY_S, Reporter, Task

F = TypeVar("F", bound=Callable[..., Any])

# soft_wrap: log lines stay one line each when stderr is a file or a pipe (grep-able).
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT): the shell convention 128 + 2."""
EXIT_TERMINATED = 143
"""SIGTERM (how CI runners and batch queues stop a job): the shell convention 128 + 15."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives (see :func:`handle_sigterm`).

    A KeyboardInterrupt, so every clean-up that runs for Ctrl-C runs for SIGTERM too: temp
    files, staging directories and stdin spools are removed on the way out.
    """


def _raise_terminated(signum: int, frame: Any) -> None:
    import signal

    # The process is on its way out: a second SIGTERM must not interrupt the clean-up (a
    # supervisor that will not wait sends SIGKILL, after which the next run cleans up).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def handle_sigterm() -> None:
    """Make SIGTERM behave like Ctrl-C (exit 143 instead of 130); call once at start-up."""
    import signal

    signal.signal(signal.SIGTERM, _raise_terminated)


def interrupted(exc: BaseException) -> tuple[str, int]:
    """The error line and exit code of an interruption (Ctrl-C or SIGTERM).

    A note the library attached (:func:`tvtool.errors.note_interruption`: where a
    fine-tuning run's state is and how to continue) follows on the same line.
    """
    note = interruption_note(exc)
    tail = f"; {note}" if note else ""
    if isinstance(exc, Terminated):
        return f"terminated (SIGTERM){tail}", EXIT_TERMINATED
    return f"interrupted{tail}", EXIT_INTERRUPTED


def debug_enabled() -> bool:
    """Whether ``TVTOOL_DEBUG=1`` asks for full tracebacks."""
    return os.environ.get("TVTOOL_DEBUG", "") not in ("", "0")


def report_error(message: str) -> None:
    """Print a one-line error on stderr, bounded (:func:`tvtool.errors.bounded_line`)."""
    sys.stderr.write(f"tvtool: error: {bounded_line(message)}\n")
    sys.stderr.flush()


def current_context() -> Any:
    """The click context of the running command, or None outside one."""
    import importlib

    try:  # typer >= 0.22 vendors its own click
        globals_ = importlib.import_module("typer._click.globals")
    except ImportError:  # pragma: no cover - older typer, plain click
        globals_ = importlib.import_module("click.globals")
    return globals_.get_current_context(silent=True)


def command_options(ctx: Any) -> set[str]:
    """Every option string of the command ``ctx`` runs (``--base``, ``-b``...)."""
    if ctx is None:
        return set()
    return {opt for param in ctx.command.get_params(ctx)
            for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")}


_FLAG = re.compile(r"(?<![\w-])--?[a-zA-Z][\w-]*")
_OTHER_COMMAND = re.compile(r"\btvtool [a-z]")


def fit_hint(hint: str | None, options: set[str]) -> str | None:
    """A library hint without the advice that names flags the running command lacks.

    The library's errors are shared by several commands; a hint such as "pass
    --approximate-linearized" is right for ``apply`` and ``eval`` and wrong for
    ``learn-coeffs``. The hint is split into its alternatives (``;`` and ``, or``); those
    naming a flag the command lacks are dropped, unless they name another command
    (``tvtool extract --allow-missing``). With no command options known, the hint is kept.
    """
    if not hint or not options:
        return hint
    parts = [p.strip() for p in re.split(r";\s*|,?\s+or\s+(?=pass |use |give |add |--)", hint)
             if p.strip()]
    kept = [part for part in parts if _OTHER_COMMAND.search(part)
            or all(flag in options for flag in _FLAG.findall(part))]
    if len(kept) == len(parts):
        return hint
    return ", or ".join(kept) if kept else None


def environment_note(message: str, ctx: Any) -> str:
    """Name the environment variable behind a refused value (``TVTOOL_DEVICE=bogus``).

    A value that came from ``TVTOOL_*`` rather than the command line is otherwise a puzzle:
    the user never typed it. Returns ``message`` with ``(from the environment: VAR=value)``
    when a parameter of ``ctx`` whose value came from its variable is named in it (by its
    flag or its quoted value); unchanged otherwise.
    """
    if ctx is None:
        return message
    notes = []
    for param in ctx.command.get_params(ctx):
        source = ctx.get_parameter_source(param.name) if param.name else None
        if getattr(source, "name", "") != "ENVIRONMENT" or not param.envvar:
            continue
        value = ctx.params.get(param.name)
        names = [*param.opts, repr(value), repr(str(value))]
        if any(name in message for name in names):
            variable = param.envvar if isinstance(param.envvar, str) else param.envvar[0]
            notes.append(f"{variable}={os.environ.get(variable, value)!s:.40}")
    return f"{message} (from the environment: {', '.join(notes)})" if notes else message


def handles_errors(func: F) -> F:
    """Map library errors to a one-line message and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if kwargs.get("as_json") and _stdout_closed():
                # Before the work: the report would be lost after the outputs were written.
                from tvtool.errors import InvalidInputError

                raise InvalidInputError("--json writes to stdout, but stdout is closed",
                                        hint="redirect stdout to a file or a pipe")
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except TvtoolError as exc:
            if debug_enabled():
                traceback.print_exc()
            ctx = current_context()
            message = environment_note(" ".join(exc.message.split()), ctx)
            hint = fit_hint(exc.hint, command_options(ctx))
            report_error(message + (f" (hint: {' '.join(hint.split())})" if hint else ""))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            message, code = interrupted(exc)
            report_error(message)
            raise typer.Exit(code) from None
        except OSError as exc:
            # Files vanishing or permissions changing mid-run: a runtime failure, not a bug.
            if debug_enabled():
                traceback.print_exc()
            from tvtool.limits import short_name

            where = f": {short_name(str(exc.filename), 160)}" if exc.filename else ""
            # Libraries raise OSError(message) without errno/strerror (a tokenizer missing
            # from an offline cache): their message is what says what went wrong.
            text = exc.strerror or " ".join(str(exc).split())[:300] or type(exc).__name__
            report_error(f"{text}{where} (hint: check the paths, permissions, disk space and "
                         "network; rerun with TVTOOL_DEBUG=1 for the traceback)")
            raise typer.Exit(EXIT_FAILURE) from None
        except Exception as exc:  # last line of defence: a bug, reported on one line
            if debug_enabled():
                traceback.print_exc()
            text = " ".join(str(exc).split())[:300]
            report_error(f"internal error: {type(exc).__name__}: {text} "
                         "(rerun with TVTOOL_DEBUG=1 for the traceback)")
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper  # type: ignore[return-value]


class _LibraryFormatter(logging.Formatter):
    """``warning (huggingface_hub.x): message``: a library's log record on one line."""

    def format(self, record: logging.LogRecord) -> str:
        who = "" if record.name == "root" else f" ({record.name})"
        return " ".join(f"{record.levelname.lower()}{who}: {record.getMessage()}".split())


def wire_logging() -> None:
    """Give the libraries' log records one handler on stderr; call once at start-up.

    open_clip logs through the root logger with ``logging.warning()``, which installs a
    default root handler on first use, and huggingface_hub both prints through a handler of
    its own and passes each record on to the root: every hub warning came out twice. tvtool
    installs the root handler itself, and huggingface_hub's records stay with its own handler.
    """
    root = logging.getLogger()
    if not any(isinstance(h.formatter, _LibraryFormatter) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(_LibraryFormatter())
        root.addHandler(handler)
    logging.getLogger("huggingface_hub").propagate = False


def log(message: str) -> None:
    """Log a progress or info line on stderr (verbatim: brackets are not rich markup)."""
    stderr.print(message, markup=False)


def emit_path(path: str) -> None:
    """Print an output path on stdout (nothing when the data itself went to stdout)."""
    if path != "-" and sys.stdout is not None:  # stdout closed (>&-): the file is the result
        sys.stdout.write(f"{path}\n")
        sys.stdout.flush()


def refuse_json_with_stdout(as_json: bool, output: str) -> None:
    """Refuse ``--json`` together with ``-o -``: both would claim stdout.

    Raises:
        UsageError: when both are given.
    """
    if as_json and output == "-":
        from tvtool.errors import UsageError

        raise UsageError("--json and -o - both write to stdout",
                         hint="write the file with -o PATH, or drop --json")


def percent(value: float | None) -> str:
    """An accuracy as a percentage with two decimals for tables; ``–`` when it is undefined.

    Undefined covers None and NaN (a normalized accuracy whose reference accuracy is 0).
    """
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"


REPORT_VERSION = 1
"""Version of the ``--json`` documents that do not declare their own (docs/cli.md, "JSON")."""


def report_kind() -> str:
    """The ``report`` kind of the running command's ``--json`` document: its name.

    ``tvtool merge`` -> ``merge``, ``tvtool eval disentanglement`` -> ``eval-disentanglement``.
    """
    ctx = current_context()
    path = getattr(ctx, "command_path", "") or ""
    words = path.split()[1:]  # without the program name
    return "-".join(words) if words else "tvtool"


def _stdout_closed() -> bool:
    from tvtool.io.atomic import stdout_closed

    return stdout_closed()


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def emit_json(document: Any, report: str | None = None, *,
              outputs: Sequence[str | None] = ()) -> None:
    """Print one JSON document on stdout, with its ``report`` kind and ``report_version``.

    A document that names its own kind (``eval``, ``merge-search``...) keeps it; any other gets
    ``report`` (default: the command's name, see :func:`report_kind`) and
    ``report_version`` :data:`REPORT_VERSION` as its first keys, so a consumer can always
    tell what it reads.

    The report is part of the command's result: when it cannot be written (stdout closed,
    a full disk behind it, a reader that went away), the command fails and ``outputs`` are
    removed, so that a failed command leaves nothing behind.

    Args:
        document: The report.
        report: Its ``report`` kind when it names none (default: the command's name).
        outputs: Files or directories the command wrote (``None`` and ``-`` are skipped).

    Raises:
        InvalidInputError: stdout is closed (``>&-``), so the document would be lost.
        TvtoolError: writing to stdout failed (exit 1).
    """
    from tvtool.errors import InvalidInputError
    from tvtool.io.atomic import stdout_error

    error: TvtoolError
    if sys.stdout is None:
        error = InvalidInputError("--json writes to stdout, but stdout is closed",
                                  hint="redirect stdout to a file or a pipe")
    else:
        if isinstance(document, dict):
            document = with_report(document, report or report_kind())
        try:
            _write_stdout(json.dumps(document, indent=2, default=str) + "\n")
            return
        except OSError as exc:
            error = stdout_error(exc, "the JSON report")
    removed = _remove_outputs(outputs)
    if removed:
        error = type(error)(f"{error.message}; removed the output{'s' if len(removed) > 1 else ''}"
                            f" {', '.join(repr(p) for p in removed)}", hint=error.hint)
    raise error


def _remove_outputs(outputs: Sequence[str | None]) -> list[str]:
    from tvtool.io import remove_output

    return [path for path in dict.fromkeys(p for p in outputs if p) if remove_output(path)]


def with_report(document: dict[str, Any], report: str) -> dict[str, Any]:
    """``document`` with ``report`` and ``report_version`` first (kept where it has them)."""
    head = {"report": document.get("report", report),
            "report_version": document.get("report_version", REPORT_VERSION)}
    return {**head, **{k: v for k, v in document.items() if k not in head}}


_reporter: Reporter | None = None


def configure_progress(quiet: bool = False, log_every: float | None = None) -> Reporter:
    """Set up this run's progress reporter (:class:`tvtool.progress.Reporter`) on stderr.

    Args:
        quiet: Report no progress (``--quiet``).
        log_every: Seconds between plain progress lines when stderr is not a terminal
            (``--log-every``; default 30).

    Returns:
        The reporter, also what :func:`progress_bar` and :func:`reporter` use from now on.
    """
    from tvtool.errors import UsageError

    if log_every is not None and not (log_every >= 0):
        raise UsageError(f"--log-every must be 0 or more seconds, not {log_every:g}")
    global _reporter
    _reporter = Reporter(log, terminal=stderr.is_terminal, console=stderr, quiet=quiet,
                         every=DEFAULT_EVERY_S if log_every is None else log_every)
    return _reporter


def reporter() -> Reporter:
    """This run's progress reporter (:func:`configure_progress` with defaults if not set)."""
    return _reporter if _reporter is not None else configure_progress()


def progress_bar(description: str, total: int | None
                 ) -> contextlib.AbstractContextManager[Task]:
    """Progress of one task on stderr: a rich bar on a terminal, else a line every 30 s.

    A :data:`tvtool.types.ProgressFactory` over :func:`reporter`; ``--quiet`` silences it.

    Yields:
        A function advancing the task by ``n`` steps (and setting shown fields).
    """
    return reporter().task(description, total)


def print_table(table: Any, console: Any = None) -> None:
    """Print a rich table whole: on a file or a pipe it is not cut to 80 columns.

    A terminal (or ``COLUMNS`` in the environment) sets the width; otherwise the table gets
    the width it needs, so dataset names stay whole.
    """
    from rich.measure import Measurement

    console = console if console is not None else stderr
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        console.print(table)
        return
    width = Measurement.get(console, console.options.update_width(10_000), table).maximum
    # Console.print crops to the console's width: print through one as wide as the table.
    Console(file=console.file, width=max(width, 20), highlight=False,
            color_system=None).print(table)


def listed_or(names: Sequence[str]) -> str:
    """``a, b or c``: names listed in a help text (``a`` alone for one name)."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


# Options shared by several commands (typer Annotated aliases).
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output file, or - for stdout.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout.")]
TensorboardOpt = Annotated[str | None, typer.Option(
    "--tensorboard", rich_help_panel="Progress", metavar="DIR",
    help="Also write the metrics as TensorBoard scalars into DIR (needs the tensorboard "
         "extra: pip install 'tvtool[tensorboard]').", show_default=False)]
# Progress on stderr (tvtool.progress): every command that can run for minutes takes both.
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", rich_help_panel="Progress",
    help="No progress bars or lines on stderr (warnings and errors still print).")]
LogEveryOpt = Annotated[float, typer.Option(
    "--log-every", rich_help_panel="Progress", envvar="TVTOOL_LOG_EVERY", metavar="SECONDS",
    help="Seconds between progress lines when stderr is not a terminal (a file, a pipe).")]
DeviceOpt = Annotated[str, typer.Option("--device", envvar="TVTOOL_DEVICE",
                                        metavar="[auto|cpu|cuda|cuda:N]",
                                        help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option("--seed", envvar="TVTOOL_SEED", help="Random seed.")]
RESUME_NAMES = ("auto", "yes", "no")
"""``--resume``'s values: tvtool.io.train_state.RESUME_CHOICES, named without importing torch
so that ``--help`` stays fast (tests/test_cli_grammar.py checks they agree)."""
WorkdirOpt = Annotated[str | None, typer.Option(
    "--workdir", rich_help_panel="Resumable runs", envvar="TVTOOL_WORKDIR",
    help="Directory for the resumable training state.", show_default=False)]
CheckpointEveryOpt = Annotated[int, typer.Option(
    "--checkpoint-every", rich_help_panel="Resumable runs",
    help="Steps between training-state saves (with --workdir).")]
PrecisionOpt = Annotated[str, typer.Option("--precision", envvar="TVTOOL_PRECISION",
                                           metavar="[auto|fp32|bf16|fp16]",
                                           help="fp32, bf16 or fp16 (autocast on GPU).")]
# The model-and-data options of the long commands (finetune, learn-coeffs), in their panel.
BaseOpt = Annotated[str, typer.Option("--base", "-b", rich_help_panel="Model and data",
                                      envvar="TVTOOL_BASE",
                                      help="Model reference of the pre-trained base.")]
DataRootOpt = Annotated[str | None, typer.Option(
    "--data-root", rich_help_panel="Model and data", envvar="TVTOOL_DATA_ROOT",
    help="Root directory of the standard datasets.", show_default=False)]
WorkersOpt = Annotated[int, typer.Option(
    "--workers", help="DataLoader worker processes.")]
AllowOtherBaseOpt = Annotated[bool, typer.Option(
    "--allow-base-mismatch",
    help="Use vectors whose recorded base fingerprint differs from the base (unsafe).")]


# --------------------------------------------------------------------------------------------
# One grammar: value names, flags without metavar, deprecated spellings
# --------------------------------------------------------------------------------------------

VALUE_NAMES: dict[str, str] = {
    "--base": "REF", "--output": "PATH", "--dataset": "DATASET", "--control": "DATASET",
    "--target": "DATASET", "--data-root": "DIR", "--workdir": "DIR", "--hf-dir": "DIR",
    "--checkpoint-out": "PATH", "--merged-out": "PATH", "--architecture": "NAME",
    "--coefs": "FILE", "--config": "FILE", "--save-config": "FILE", "--search-report": "FILE",
    "--png": "PATH", "--coef-grid": "GRID", "--param": "KEY=VALUE", "--reference": "FILE",
    "--head": "FILE", "--coef": "FLOAT",
}
"""The one name of each free-form option's value in ``--help``, whatever the command.

Options with a fixed set of values name them instead (``[val|test]``, declared with the
option); :func:`normalize_options` fills these in for options that declare no metavar, and
tests/test_cli_grammar.py fails on a string option left showing ``<str>``.
"""


def normalize_options(params: Iterable[Any]) -> None:
    """Apply the grammar's help conventions to click parameters, in place.

    Flags show no value (typer would print ``<bool>``, inviting ``--json true``); free-form
    values are named from :data:`VALUE_NAMES`.
    """
    for param in params:
        if getattr(param, "param_type_name", "") != "option":
            continue
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.metavar is None:
            long = next((o for o in param.opts if o.startswith("--")), None)
            if long in VALUE_NAMES:
                param.metavar = VALUE_NAMES[long]


def normalize_command(command: Any) -> Any:
    """:func:`normalize_options` over a click command and its subcommands; returns it."""
    normalize_options(command.params)
    # click's --help option is made (and cached) on first use; a click without that API
    # keeps its own.
    with contextlib.suppress(AttributeError, TypeError):
        normalize_options([command.get_help_option(_HelpContext(command))])
    for sub in getattr(command, "commands", {}).values():
        normalize_command(sub)
    return command


class _HelpContext:
    """What ``Command.get_help_option`` reads from a context (its help option names)."""

    def __init__(self, command: Any) -> None:
        self.command = command
        self.help_option_names = ["--help"]


def deprecated_alias(old: str, new: str) -> Any:
    """A hidden option accepting ``old``, the previous spelling of ``new``, for one release.

    Giving it prints one line on stderr; the command takes its value with
    :func:`take_alias`.
    """

    def note(ctx: typer.Context, value: Any) -> Any:
        if value not in (None, False, [], ()) and not ctx.resilient_parsing:
            sys.stderr.write(f"tvtool: warning: {old} is deprecated, use {new} (the old "
                             "spelling goes away in the next release)\n")
        return value

    return typer.Option(old, hidden=True, callback=note, show_default=False,
                        help=f"Deprecated spelling of {new}.")


def given(ctx: Any, name: str) -> bool:
    """Whether parameter ``name`` was given (command line or environment), not defaulted."""
    return getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE",
                                                                    "ENVIRONMENT")


def take_alias(ctx: Any, name: str, value: Any, alias_value: Any) -> Any:
    """The value of option ``name``, given under its own or its deprecated spelling.

    Raises:
        UsageError: both spellings given.
    """
    if alias_value is None:
        return value
    if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE":
        from tvtool.errors import UsageError

        flag = next((p.opts[0] for p in ctx.command.params if p.name == name), name)
        raise UsageError(f"{flag} was given twice (once under its deprecated spelling)")
    return alias_value


DownloadOpt = Annotated[bool, typer.Option(
    "--download", help="Download missing standard datasets into --data-root first (network).")]
SuiteOpt = Annotated[str | None, typer.Option(
    "--suite", metavar="[8|14|20]", show_default=False,
    help="The 8-, 14- or 20-task benchmark's datasets, added after any --dataset "
         "(docs/data.md).")]


def download_datasets(names: Iterable[str | None], data_root: str | None) -> None:
    """Fetch the standard datasets among ``names`` into the data root (``--download``)."""
    from tvtool.data import download

    for name in dict.fromkeys(n for n in names if n):
        download(name, data_root, log=log)


# --------------------------------------------------------------------------------------------
# Flags declared by the library (a fine-tuning mode's options)
# --------------------------------------------------------------------------------------------

DECLARED_OPTIONS = "tvtool.declared_options"
"""Key of ``ctx.meta`` under which a :class:`DeclaredOptionsCommand` leaves its values."""


@dataclass(frozen=True)
class DeclaredOption:
    """One flag whose name, type, default and help come from a library declaration.

    Attributes:
        name: Parameter name the value is passed under.
        type: ``int``, ``float``, ``str`` or ``bool``.
        default: Default value (in the flag's type).
        flag: The flag, e.g. ``--lora-rank``.
        help: Help text.
        metavar: Shown instead of the type; None = the type.
        panel: Group in ``--help``.
    """

    name: str
    type: type
    default: Any
    flag: str
    help: str
    metavar: str | None = None
    panel: str | None = None


def _click_parameters(options: Sequence[DeclaredOption]) -> list[Any]:
    """Typer's own click parameters for ``options`` (so they parse and show like the rest)."""

    def values(**kwargs: Any) -> None:
        return None

    parameters = [inspect.Parameter(
        o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
        annotation=Annotated[o.type, typer.Option(o.flag, help=o.help, metavar=o.metavar,
                                                  rich_help_panel=o.panel)])
        for o in options]
    values.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    values.__annotations__ = {p.name: p.annotation for p in parameters}
    holder = typer.Typer(add_completion=False)
    holder.command()(values)
    return list(typer.main.get_command(holder).params)


def _nothing_declared() -> list[DeclaredOption]:
    return []


def _no_descriptions() -> dict[str, str]:
    return {}


class DeclaredOptionsCommand(TyperCommand):
    """A command whose flags or help texts are partly declared by the library.

    Subclasses set :attr:`declare` (extra flags), :attr:`describe` (help texts of existing
    parameters, by parameter name, e.g. ``--method`` listing the registered methods) and/or
    :attr:`metavars` (metavars of existing parameters, by parameter name, e.g. ``--mode``
    showing the registered modes). They are called only when this command parses or shows its
    help, so the library they import (torch) stays out of ``tvtool --help`` and of the other
    commands. The
    values of declared flags reach the command function in ``ctx.meta[DECLARED_OPTIONS]``
    (a dict by :attr:`DeclaredOption.name`).
    """

    declare: ClassVar[Callable[[], Sequence[DeclaredOption]]] = _nothing_declared
    describe: ClassVar[Callable[[], dict[str, str]]] = _no_descriptions
    metavars: ClassVar[Callable[[], dict[str, str]]] = _no_descriptions
    _declared: list[str] | None = None

    def get_params(self, ctx: Any) -> list[Any]:
        if self._declared is None:
            extra = _click_parameters(type(self).declare())
            self._declared = [p.name for p in extra]
            self.params.extend(extra)
            normalize_options(extra)
            helps = type(self).describe()
            metavars = type(self).metavars()
            for param in self.params:
                if isinstance(param, TyperOption) and param.name in helps:
                    param.help = helps[param.name]
                if isinstance(param, TyperOption) and param.name in metavars:
                    param.metavar = metavars[param.name]
        return super().get_params(ctx)  # type: ignore[no-any-return]

    def invoke(self, ctx: Any) -> Any:
        self.get_params(ctx)
        ctx.meta[DECLARED_OPTIONS] = {name: ctx.params.pop(name)
                                      for name in self._declared or () if name in ctx.params}
        return super().invoke(ctx)
