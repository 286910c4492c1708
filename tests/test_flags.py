"""One meaning per flag (DESIGN.md §4): a flag name has one value type in every command that takes
it, the flags whose meaning is shared word for word have one help text, and every value shown in
`--help` has an uppercase metavar."""

from __future__ import annotations

import re

import pytest
import typer.main

from cgtools.cli.main import app

GROUP = typer.main.get_command(app)

# Flags that mean exactly the same thing wherever they appear: one help text (use the aliases in
# cgtools/cli/options.py). Flags not listed here may describe their command's own output or
# batch (e.g. -o is a table, a figure or a run directory), but still have one value type.
SAME_HELP = {"--seed", "--json", "--force", "--threads", "--device", "--grammar", "--tag", "--denoiser",
             "--sampling-steps", "--limit", "--preset", "--process", "--T", "--schedule", "--depth",
             "--branching", "--synonyms", "--n-classes", "--noise"}
# Commands that run a model take --threads and --device.
RUNS_A_MODEL = {"train", "sample", "forward-backward", "sensitivity"}


def _options():
    """(command, flag, option) for every visible option of every command."""
    for name, cmd in GROUP.commands.items():
        for p in cmd.params:
            if type(p).__name__ != "TyperOption" or p.hidden:
                continue
            for flag in p.opts + p.secondary_opts:
                yield name, flag, p


def test_a_flag_has_one_type_and_shared_flags_one_help_text():
    seen: dict[str, dict[str, tuple]] = {}
    for name, flag, p in _options():
        if flag.startswith("--no-"):
            continue
        seen.setdefault(flag, {})[name] = (p.type_descriptor.annotation, p.help)
    problems = []
    for flag, uses in sorted(seen.items()):
        types = {t for t, _ in uses.values()}
        if len(types) > 1:
            problems.append(f"{flag}: types {sorted(map(str, types))} in {sorted(uses)}")
        if flag in SAME_HELP and len({h for _, h in uses.values()}) > 1:
            problems.append(f"{flag}: different help texts in {sorted(uses)}")
    assert not problems, "\n".join(problems)


def test_commands_that_run_a_model_take_threads_and_device():
    for name in RUNS_A_MODEL:
        flags = {f for cmd, f, _ in _options() if cmd == name}
        assert {"--threads", "--device"} <= flags, name


@pytest.mark.parametrize("name", sorted(GROUP.commands))
def test_metavars_are_uppercase(name):
    cmd = GROUP.commands[name]
    for p in cmd.params:
        if getattr(p, "hidden", False) or getattr(p, "is_flag", False):
            continue
        if p.metavar is not None:
            # a placeholder is uppercase; literal choices may be spelled out (bp|CKPT)
            placeholders = [part for part in p.metavar.replace("...", "").split("|") if part != "bp"]
            assert all(part == part.upper() for part in placeholders), (name, p.name, p.metavar)
    from typer.testing import CliRunner

    usage = CliRunner().invoke(app, [name, "--help"]).stdout.splitlines()[0]
    assert usage.startswith(f"Usage: cgtools {name}"), usage
    # typer shows required arguments as {NAME}: the name must be a metavar, not the Python name
    for argument in re.findall(r"\{([^}]*)\}", usage):
        assert argument == argument.upper(), usage
