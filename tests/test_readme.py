"""The README's ``valve-id`` commands run as written after ``make up`` (issue 14).

Every ``valve-id ...`` command in a ``bash`` block or an inline code span is checked against
the real command line (typer's click objects): its subcommands exist, each ``--option`` is an
option of that subcommand, no example recommends the ``quick`` profile, and a ``state/...``
path it reads is a folder ``valve-id up`` writes (taken from :class:`StackPaths` and the
settings, so renaming a folder there fails this test).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from backend.cli import app
from backend.settings import Settings
from backend.stack.local import StackPaths

README = Path(__file__).resolve().parents[1] / "README.md"
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMAND = re.compile(r"(?:^|[\s/])valve-id\s+(\S.*)$")
SHELL_OPERATORS = frozenset({"&", "&&", "||", ";", "|"})


def _commands_in(line: str) -> list[str]:
    """The arguments after ``valve-id`` in one shell line ([] if none), placeholders filled."""
    match = COMMAND.search(" ".join(line.split()))
    if match is None:
        return []
    args = shlex.split(re.sub(r"<[^>]*>", "X", match.group(1)), comments=True)
    for i, arg in enumerate(args):
        if arg in SHELL_OPERATORS or arg.startswith(">"):
            return args[:i]
    return args


def readme_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    lines = [
        line
        for lang, body in FENCED.findall(text)
        if lang == "bash"
        for line in body.replace("\\\n", " ").splitlines()
    ]
    lines += re.findall(r"`([^`]+)`", FENCED.sub("", text))
    return [args for line in lines if (args := _commands_in(line))]


def written_by_up() -> set[str]:
    """The top-level entries of the state folder that ``valve-id up`` writes."""
    paths = StackPaths(Path("state"))
    layout = [name for name, attr in vars(StackPaths).items() if isinstance(attr, property)]
    written = {getattr(paths, name).relative_to(paths.state).parts[0] for name in layout}
    settings = Settings(state_dir=paths.state)
    return written | {
        folder.relative_to(settings.state_dir).parts[0]
        for folder in (settings.models, settings.cache)
    }


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check() -> None:
    assert len(COMMANDS) >= 10
    assert any(args[:1] == ["train"] and "--data" in args for args in COMMANDS)


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_readme_command_parses_with_the_real_cli(args: list[str]) -> None:
    command = typer.main.get_command(app)  # typer's own click: groups are known by .commands
    rest = list(args)
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in command.commands, f"valve-id has no command {name!r}"
        command = command.commands[name]
    options = {"--help"} | {
        opt for param in command.params for opt in (*param.opts, *param.secondary_opts)
    }
    for arg in rest:
        if arg.startswith("-") and arg != "-":
            assert arg.split("=")[0] in options, f"{command.name} has no option {arg}"
    for flag, value in zip(rest, rest[1:], strict=False):
        if flag == "--profile":
            assert value != "quick", "the quick profile learns nothing useful: no example uses it"


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_readme_state_paths_are_written_by_up(args: list[str]) -> None:
    written = written_by_up()
    for arg in args:
        path = arg.split("=")[-1]
        if path.startswith("state/"):
            assert Path(path).parts[1] in written, f"`valve-id up` writes no {path}"
