"""The README's and docs' ``valve-id`` commands run as written after ``make up`` (issue 14).

Every ``valve-id ...`` command in a ``bash`` block or an inline code span of ``README.md`` or
of a Markdown file under ``docs/`` (where deployment, performance and the simulation moved) is
checked against the real command line (typer's click objects): its subcommands exist, each
``--option`` is an option of that subcommand, no example recommends the ``quick`` profile, and
a ``state/...`` path it reads is a folder ``valve-id up`` writes (taken from :class:`StackPaths`
and the settings, so renaming a folder there fails this test). Every relative link between
those files points at a file that exists and, with ``#anchor``, at one of its headings.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from backend.settings import Settings
from backend.tools.cli import app
from backend.tools.stack.local import StackPaths

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
DOCUMENTS = [README, *DOCS]
"""Every Markdown file a reader is sent to: the README and what moved from it to docs/."""
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMAND = re.compile(r"(?:^|[\s/])valve-id\s+(\S.*)$")
SHELL_OPERATORS = frozenset({"&", "&&", "||", ";", "|"})
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


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


def readme_commands(path: Path = README) -> list[list[str]]:
    """The ``valve-id`` commands of one Markdown file (the README by default)."""
    text = path.read_text(encoding="utf-8")
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


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


COMMANDS_BY_FILE = {_name(path): readme_commands(path) for path in DOCUMENTS}
COMMANDS = COMMANDS_BY_FILE["README.md"]
CHECKED = [(name, args) for name, commands in COMMANDS_BY_FILE.items() for args in commands]
CHECKED_IDS = [f"{name}: {' '.join(args)}" for name, args in CHECKED]


def test_the_readme_has_commands_to_check() -> None:
    assert len(COMMANDS) >= 10
    assert any(args[:1] == ["train"] and "--data" in args for args in COMMANDS)


def test_the_commands_moved_to_docs_are_checked_too() -> None:
    assert any(args[:1] == ["import"] for args in COMMANDS_BY_FILE["docs/LOCAL_STACK.md"])
    deployment = COMMANDS_BY_FILE["docs/DEPLOYMENT.md"]
    assert any(args[:1] == ["import"] and "--create" in args for args in deployment)
    assert any(args[:1] == ["worker"] for args in deployment)
    simulation = COMMANDS_BY_FILE["docs/SIMULATION.md"]
    assert sum(args[:1] == ["simulate"] and "--strategies" in args for args in simulation) >= 2
    assert any(args[:1] == ["simulate"] and "--config" in args for args in simulation)


@pytest.mark.parametrize(("document", "args"), CHECKED, ids=CHECKED_IDS)
def test_readme_command_parses_with_the_real_cli(document: str, args: list[str]) -> None:
    command = typer.main.get_command(app)  # typer's own click: groups are known by .commands
    rest = list(args)
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in command.commands, f"{document}: valve-id has no command {name!r}"
        command = command.commands[name]
    options = {"--help"} | {
        opt for param in command.params for opt in (*param.opts, *param.secondary_opts)
    }
    for arg in rest:
        if arg.startswith("-") and arg != "-":
            assert arg.split("=")[0] in options, f"{document}: {command.name} has no option {arg}"
    for flag, value in zip(rest, rest[1:], strict=False):
        if flag == "--profile":
            assert value != "quick", "the quick profile learns nothing useful: no example uses it"


@pytest.mark.parametrize(("document", "args"), CHECKED, ids=CHECKED_IDS)
def test_readme_state_paths_are_written_by_up(document: str, args: list[str]) -> None:
    written = written_by_up()
    for arg in args:
        path = arg.split("=")[-1]
        if path.startswith("state/"):
            assert Path(path).parts[1] in written, f"{document}: `valve-id up` writes no {path}"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of one Markdown file (code blocks skipped)."""
    text = FENCED.sub("", path.read_text(encoding="utf-8"))
    return {
        re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        for heading in HEADING.findall(text)
    }


def test_anchors_follow_githubs_rule() -> None:
    assert {"deployment-docker-compose", "the-cpu-profile", "configuration"} <= (
        _anchors(README) | _anchors(ROOT / "docs" / "TRAINING.md")
    )


@pytest.mark.parametrize("document", DOCUMENTS, ids=_name)
def test_relative_links_resolve(document: Path) -> None:
    text = FENCED.sub("", document.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        linked = (document.parent / file).resolve() if file else document
        assert linked.exists(), f"{_name(document)}: link to missing {target}"
        assert linked.is_relative_to(ROOT), f"{_name(document)}: link outside the repo {target}"
        if anchor:
            assert anchor in _anchors(linked), f"{_name(document)}: no heading for {target}"
