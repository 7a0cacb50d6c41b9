"""The documentation lists what the code has: the README's methods table, ``distmerge methods``."""

from __future__ import annotations

import re

import pytest

from distmerge.methods import METHODS, markdown_table
from tests.helpers import REPO_ROOT, run_cli


def _section(text: str, heading: str) -> str:
    """The body of a ``## heading`` section of a Markdown document (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def test_markdown_table_has_a_complete_row_per_method():
    rows = markdown_table().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == [f"`{name}`" for name in METHODS]
    for row, method in zip(rows, METHODS.values()):
        assert f"| {method.base} |" in row
        for p in method.params:
            assert f"`{p.name}" in row, (method.name, p.name)
        assert method.summary and method.summary in row, method.name
        assert method.paper and f"({method.paper})" in row, method.name


def test_readme_methods_section_is_exactly_the_generated_table():
    """README.md holds ``markdown_table()`` verbatim, and no other table rows in ## Methods
    (a stale row for a renamed or removed method would show up here)."""
    readme = (REPO_ROOT / "README.md").read_text()
    table = markdown_table()
    assert table in readme, "README.md's methods table is out of date: paste distmerge.methods.markdown_table()"
    section = _section(readme, "Methods")
    table_lines = [line for line in section.splitlines() if line.startswith("|")]
    assert table_lines == table.splitlines()


@pytest.mark.slow
def test_methods_command_lists_every_method():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip() and not line[0].isspace()}
    assert set(METHODS) <= listed, f"not listed: {sorted(set(METHODS) - listed)}"
    for method in METHODS.values():
        for p in method.params:
            assert p.name in result.stdout, (method.name, p.name)


@pytest.mark.slow
def test_methods_markdown_flag_prints_the_table():
    result = run_cli("methods", "--markdown")
    assert result.returncode == 0, result.stderr
    assert result.stdout == markdown_table()
