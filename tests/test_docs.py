"""The documentation stays in step with the code."""

from __future__ import annotations

from pathlib import Path

import typer

from cgtools.cli.docgen import cli_reference
from cgtools.cli.main import app

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current():
    on_disk = (ROOT / "docs" / "cli.md").read_text()
    assert on_disk == cli_reference(), "regenerate with: python -m cgtools.cli.docgen > docs/cli.md"


def test_every_command_has_help_and_examples():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        assert cmd.help and len(cmd.help.strip()) > 40 and "Example" in cmd.help, name
        assert f"## cgtools {name}" in (ROOT / "docs" / "cli.md").read_text()


def test_readme_gives_the_two_commands_and_ci_runs_the_tests():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    for link in ("docs/cli.md", "docs/formats.md", "docs/choices.md", "docs/performance.md"):
        assert link in readme and (ROOT / link).exists()
