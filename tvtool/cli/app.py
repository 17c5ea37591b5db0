"""The typer application: registers one module per subcommand."""

from __future__ import annotations

import sys
from typing import Any

try:
    import typer
    from typer.core import TyperGroup

    from tvtool import __version__
    from tvtool.cli import apply as apply_cmd
    from tvtool.cli import compress as compress_cmd
    from tvtool.cli import convert as convert_cmd
    from tvtool.cli import datasets as datasets_cmd
    from tvtool.cli import demo as demo_cmd
    from tvtool.cli import eval as eval_cmd
    from tvtool.cli import export_peft as export_peft_cmd
    from tvtool.cli import extract as extract_cmd
    from tvtool.cli import finetune as finetune_cmd
    from tvtool.cli import inspect_cmd
    from tvtool.cli import learn_coeffs as learn_coeffs_cmd
    from tvtool.cli import merge as merge_cmd
    from tvtool.cli import negate as negate_cmd
    from tvtool.cli import plot as plot_cmd
    from tvtool.cli import pretrain as pretrain_cmd
    from tvtool.cli.common import (
        EXIT_INVALID,
        handle_sigterm,
        interrupted,
        normalize_command,
        report_error,
        wire_logging,
    )
except KeyboardInterrupt:  # Ctrl-C while the CLI is still importing: no traceback
    sys.stderr.write("tvtool: error: interrupted\n")
    raise SystemExit(130) from None


class _OneLineErrors(TyperGroup):
    """The root group: click's usage errors become one ``tvtool: error:`` line, exit 2.

    Errors raised inside commands are mapped by ``handles_errors``; this covers what click
    itself rejects before a command runs (unknown flags, bad values, missing arguments).
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        normalize_command(self)
        if len(args) > 3 or not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)  # a caller handling click's errors itself
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except typer.Abort as exc:
            # click turns the KeyboardInterrupt (or Terminated, for SIGTERM) into Abort.
            message, code = interrupted(exc.__cause__ or exc.__context__ or exc)
            report_error(message)
            sys.exit(code)
        except Exception as exc:
            # By class name: typer >= 0.22 vendors click, older versions use click itself.
            kinds = {cls.__name__ for cls in type(exc).__mro__}
            if "NoArgsIsHelpError" in kinds:
                exc.show()  # type: ignore[attr-defined]  # `tvtool` alone prints the help
            elif "ClickException" in kinds:
                report_error(_one_line(exc))
            else:
                raise
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        # Without standalone mode click returns typer.Exit's code, or the command's return
        # value (None: commands report through stdout and exit codes).
        sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


def _one_line(exc: Any) -> str:
    text = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and getattr(ctx, "command_path", None):
        text += f" (hint: see '{ctx.command_path} --help')"
    return text


app = typer.Typer(
    name="tvtool",
    help="Edit CLIP models with task vectors. Data on stdout, logs on stderr. "
         "Exit codes: 0 ok, 1 runtime failure, 2 usage or invalid input.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    # `tvtool --install-completion` / `--show-completion`, as typer provides them.
    add_completion=True,
    cls=_OneLineErrors,
)


def _version(value: bool) -> None:
    if value:
        if sys.stdout is None:  # started with stdout closed (>&-)
            report_error("--version writes to stdout, but stdout is closed")
            raise typer.Exit(EXIT_INVALID)
        sys.stdout.write(f"tvtool {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Edit CLIP models with task vectors."""


app.command("finetune", cls=finetune_cmd.FinetuneCommand)(finetune_cmd.finetune)
app.command("extract")(extract_cmd.extract)
app.command("negate")(negate_cmd.negate)
app.command("compress")(compress_cmd.compress)
app.command("apply")(apply_cmd.apply)
app.command("inspect")(inspect_cmd.inspect)
app.command("convert")(convert_cmd.convert)
app.command("export-peft")(export_peft_cmd.export_peft)
app.command("merge", cls=merge_cmd.MergeCommand)(merge_cmd.merge)
app.command("learn-coeffs")(learn_coeffs_cmd.learn_coeffs)
app.add_typer(eval_cmd.eval_app, name="eval")
app.command("pretrain")(pretrain_cmd.pretrain)
app.command("demo")(demo_cmd.demo)
app.command("datasets")(datasets_cmd.datasets)
app.command("plot")(plot_cmd.plot)


def click_command() -> Any:
    """The click command tree of :data:`app`, with the grammar's help conventions applied.

    What ``tvtool`` itself runs; tests walk it to check the options of every command.
    """
    return normalize_command(typer.main.get_command(app))


def main() -> None:
    """Console-script entry point."""
    handle_sigterm()
    wire_logging()
    app(prog_name="tvtool")
