"""The command line as a user meets it: --help, one-line errors."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_help_speaks_to_a_user_not_a_developer() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    head = out.split("positional arguments")[0]
    assert "argument parsing" not in head and "logging setup" not in head
    assert "python -m orchestrator run loop.yml" in head and "docs/loop-yml.md" in head
    assert "75 interrupted" in head
