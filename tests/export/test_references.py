"""export/__init__.py names, for each fast path, its plain reference and the test comparing
them: every test it names exists, so the list cannot silently go stale."""

from __future__ import annotations

import re
from pathlib import Path

import export

REPO = Path(__file__).resolve().parents[2]


def test_every_named_comparison_test_exists() -> None:
    doc = export.__doc__ or ""
    named = re.findall(r"(tests/\S+\.py)::(\w+)((?:, \w+)*)", doc)
    assert len(named) >= 10
    for path, first, more in named:
        source = (REPO / path).read_text()
        for name in [first, *filter(None, more.split(", "))]:
            assert f"def {name}(" in source, f"{path} has no {name}"
