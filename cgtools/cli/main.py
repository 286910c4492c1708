"""The `cgtools` application: global options, command registry, and the error policy.

Known errors (CgtoolsError, unreadable files) print one line `cgtools <cmd>: error: ...` on stderr
and exit 1; usage errors exit 2 (click); Ctrl-C exits 130. `--debug` or CGTOOLS_DEBUG=1 shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

import cgtools
from cgtools.errors import CgtoolsError
from cgtools.logs import setup_logging


def _debug_wanted(ctx: click.Context) -> bool:
    obj = ctx.obj if isinstance(ctx.obj, dict) else {}
    return bool(obj.get("debug")) or os.environ.get("CGTOOLS_DEBUG", "") not in ("", "0")


class CgtoolsGroup(TyperGroup):
    """Runs a command and turns known errors into one line on stderr and exit code 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # registration order, not alphabetical

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if _debug_wanted(ctx):
                raise
            # Ctrl-C: outputs in progress were temporaries and are gone; a training run saved its state.
            click.echo(f"cgtools {ctx.invoked_subcommand or ''}: interrupted".replace("  ", " "), err=True)
            ctx.exit(130)
        except (CgtoolsError, OSError, MemoryError, RuntimeError) as exc:
            if _debug_wanted(ctx) or isinstance(exc, BrokenPipeError):
                raise
            if isinstance(exc, RuntimeError) and not _out_of_memory(exc):
                raise  # a bug: keep the traceback
            name = ctx.invoked_subcommand or ""
            if isinstance(exc, CgtoolsError):
                message = str(exc)
            elif isinstance(exc, OSError):
                message = _os_message(exc)
            else:
                message = ("out of memory; lower --batch-size (or the model's --width), or use a machine "
                           "with more memory")
            message = " ".join(str(message).split())  # one line, whatever a library put in it
            click.echo(f"cgtools {name}: error: {message}", err=True)
            ctx.exit(1)


def _out_of_memory(exc: BaseException) -> bool:
    """torch's allocator failures (CPU: 'not enough memory', CUDA: 'out of memory')."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "not enough memory" in text or "out of memory" in text


def _os_message(exc: OSError) -> str:
    if exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


app = typer.Typer(
    cls=CgtoolsGroup,
    name="cgtools",
    help="Compositional generalisation toolkit: Random Hierarchy Model data, discrete diffusion, "
    "exact inference and the analyses of Favero et al. (ICML 2025).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cgtools {cgtools.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Debug messages on stderr.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Only warnings and errors on stderr; no bars.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors (also CGTOOLS_DEBUG=1).")] = False,
) -> None:
    setup_logging(-1 if quiet else (1 if verbose else 0))
    ctx.obj = {"debug": debug}


# (command name, module under cgtools.cli, function): one line per command, in `--help` order.
COMMANDS = (
    ("rhm-gen", "rhm_gen", "rhm_gen"),
    ("measure-accuracy", "measure_accuracy", "measure_accuracy"),
    ("theory", "theory", "theory"),
    ("train", "train", "train"),
    ("sweep", "sweep", "sweep"),
    ("sample", "sample", "sample"),
    ("forward-backward", "forward_backward", "forward_backward"),
    ("correlate", "correlate", "correlate"),
    ("perplexity", "perplexity", "perplexity"),
    ("mmd", "mmd", "mmd"),
    ("cluster", "cluster", "cluster"),
    ("sensitivity", "sensitivity", "sensitivity"),
    ("sample-complexity", "sample_complexity", "sample_complexity"),
    ("plot", "plot", "plot"),
    ("tokenize", "tokenize", "tokenize"),
    ("detokenize", "detokenize", "detokenize"),
    ("images", "images", "images"),
)


def _register() -> None:
    # Each module holds one command and imports heavy libraries (torch) inside the command, so
    # `cgtools --help` stays fast.
    import importlib

    for name, module, function in COMMANDS:
        app.command(name)(getattr(importlib.import_module(f"cgtools.cli.{module}"), function))


_register()


def main() -> None:
    """Console entry point."""
    try:
        app(prog_name="cgtools")
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): Python docs, "Note on SIGPIPE".
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("cgtools: interrupted\n")
        sys.exit(130)
