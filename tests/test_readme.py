"""Every python snippet in the README runs (in a temporary working directory, offline)."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(python_snippets()) >= 3


def test_readme_snippets_run_in_order(tmp_path, monkeypatch):
    repo = README.parent
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(repo / "data")
    namespace: dict = {}
    for index, snippet in enumerate(python_snippets()):
        try:
            exec(compile(snippet, f"README.md snippet {index}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - failure path
            pytest.fail(f"README snippet {index} failed: {error!r}\n{snippet}")
