"""Generate docs/cli.md from the commands' own --help (run `python -m cgtools.cli.docgen`)."""

from __future__ import annotations

import click
import typer

from cgtools.cli.main import app

WIDTH = 100


def _help(cmd: click.Command, name: str, parent: click.Context | None) -> str:
    ctx = click.Context(cmd, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH)
    return cmd.get_help(ctx)


def cli_reference() -> str:
    """The whole CLI reference as Markdown: the top-level help, then one section per command."""
    group = typer.main.get_command(app)
    root = click.Context(group, info_name="cgtools", terminal_width=WIDTH, max_content_width=WIDTH)
    parts = ["# CLI reference", "",
             "Generated from `--help` by `python -m cgtools.cli.docgen > docs/cli.md`; a test keeps it in step.",
             "See [formats.md](formats.md) for the files and [choices.md](choices.md) for the choices made",
             "where the paper is silent.", "", "```", _help(group, "cgtools", None), "```", ""]
    for name in group.list_commands(root):
        parts += [f"## cgtools {name}", "", "```", _help(group.get_command(root, name), name, root), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    click.echo(cli_reference(), nl=False)
