"""docs/diffusers.md: every ``python`` snippet runs, in order, in one namespace (offline, tiny)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "diffusers.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_snippets():
    assert len(snippets()) >= 5


@pytest.mark.slow
def test_diffusers_doc_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)  # the snippets write under outputs/
    namespace: dict = {}
    for i, code in enumerate(snippets()):
        try:
            exec(compile(code, f"{DOC.name} snippet {i + 1}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"snippet {i + 1} of {DOC.name} failed: {err!r}\n{code}") from err
    assert type(namespace["again"]).__name__ == "UniPortraitPipeline"
