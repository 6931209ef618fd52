"""docs/faults.md: every fault row declares its outcome and names a test that exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "faults.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")
COLUMNS = ["fault", "HTTP status", "in-band JSON-RPC error (`error.data.reason`)", "metric", "log event", "test"]


def _rows() -> list[list[str]]:
    """The body rows of every fault table (cells split on ``|``, header and rule rows skipped)."""
    rows, in_table = [], False
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells == COLUMNS:
            in_table = True
        elif in_table and not set(line) <= set("|- "):
            rows.append(cells)
    return rows


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name.startswith("test_")}


ROWS = _rows()


def test_the_doc_has_fault_tables_for_every_dependency_and_for_clients() -> None:
    text = DOC.read_text()
    for heading in ("## Upstream MCP servers", "## Redis", "## Authorization servers", "## Floods and slow clients"):
        assert heading in text
    assert len(ROWS) >= 30, len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r[0][:60] for r in ROWS])
def test_every_fault_row_declares_an_outcome_and_names_an_existing_test(row: list[str]) -> None:
    assert len(row) == len(COLUMNS), row
    fault, status, _inband, metric, _log, test = row
    assert fault and status and metric, row
    ref = TEST_REF.fullmatch(test)
    assert ref is not None, f"the test cell must be `tests/<file>.py::<test>`: {test!r}"
    path = REPO / ref.group(1)
    assert path.is_file(), f"{ref.group(1)} does not exist"
    assert ref.group(2) in _tests_in(path), f"{ref.group(1)} has no test named {ref.group(2)}"
