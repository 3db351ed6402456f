"""The loop.yml reference page is the schema's own docstrings, kept in sync."""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator import configdoc
from orchestrator.config import LoopConfig
from tests.conftest import REPO


def test_reference_page_matches_the_schema() -> None:
    page = configdoc.PAGE.read_text()
    assert page == configdoc.render(), (
        "docs/loop-yml.md is out of date with orchestrator/config.py: "
        "run `.venv/bin/python -m orchestrator.configdoc --write`"
    )


def test_every_key_is_documented_and_on_the_page() -> None:
    page = configdoc.PAGE.read_text()
    for model, paths in configdoc._sections(LoopConfig):
        assert issubclass(model, BaseModel)
        for name in model.model_fields:
            key = f"{paths[0]}.{name}" if paths[0] else name
            assert configdoc.field_docs(model).get(name), f"{model.__name__}.{name} has no docstring in config.py"
            assert f"| `{key}` |" in page


def test_reference_page_is_linked_from_readme_and_walkthrough() -> None:
    assert "docs/loop-yml.md" in (REPO / "README.md").read_text()
    assert "loop-yml.md" in (REPO / "docs" / "adding-a-simulation.md").read_text()
