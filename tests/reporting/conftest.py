from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def synthetic_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reduced report of synthetic results (tests/reporting/synthetic.py), drawn once per session."""
    import synthetic

    out = tmp_path_factory.mktemp("synthetic-report")
    md, html, sections, used = synthetic.build_report(out)
    return {"dir": out, "md": md, "html": html, "sections": sections, "reporters": used}
