"""``--help`` of ``serve``, ``worker`` and ``import`` names the environment each needs (issue
14), from :data:`backend.settings.VERB_SETTINGS`, so help and settings cannot drift."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from backend.settings import Settings
from backend.tools.cli import app

NEEDED = {
    "serve": {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL", "BASIC_AUTH_PASS"},
    "worker": {"REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"},
    "import": {"LABEL_STUDIO_URL", "VALVE_ID_PSEUDONYM_KEY", "LOCAL_FILES_DOCUMENT_ROOT"},
}
"""What each verb cannot work without (the README's Configuration table)."""


@pytest.mark.parametrize("verb", sorted(NEEDED))
def test_help_names_the_environment_the_verb_needs(verb: str) -> None:
    result = CliRunner().invoke(app, [verb, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    match = re.search(r"Environment: ([A-Z_, ]+)", text)
    assert match, f"`valve-id {verb} --help` names no environment variables"
    named = {name.strip() for name in match.group(1).split(",")}
    assert NEEDED[verb] <= named
    assert named <= set(Settings._ENV.values()), "each one is a real setting"
