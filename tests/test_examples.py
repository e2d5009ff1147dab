"""The examples run as written: the quick-start notebook, and the README's "From Python" block.

Each runs in a fresh folder, as a new user would run it, with nothing downloaded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fresh_environment() -> dict[str, str]:
    """This process's environment without the test session's redirections: paths take their defaults
    inside the fresh folder, as they would for a user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTNESS_")}
    env.setdefault("WANDB_MODE", "offline")
    env.update(ONE_THREAD)
    return env


# One thread per process, as conftest.py sets for the suite: the test workers already use both
# cores, and more threads would spin against each other.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.slow
def test_the_quickstart_notebook_runs_and_writes_its_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat  # the dev extra (make install) holds nbformat, nbclient and ipykernel
    from nbclient import NotebookClient

    for key in [k for k in os.environ if k.startswith("ROBUSTNESS_")]:
        monkeypatch.delenv(key)  # the kernel inherits this environment: the notebook's own paths apply
    for key, value in ONE_THREAD.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    began = time.monotonic()
    client.execute()
    seconds = time.monotonic() - began
    print(f"examples/quickstart.ipynb ran in {seconds:.1f} s")

    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert "error" not in {output.get("output_type") for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])}
    # The stored variant was trained into the notebook's own store and listed from there.
    assert re.search(r"^base\s+[0-9a-f]{12}\s+digits\s+smallcnn\s+0\.\d+", printed, re.MULTILINE), printed[:2000]
    assert (tmp_path / "quickstart_store" / "digits" / "smallcnn" / "aliases.json").is_file()
    # Both models were probed, side by side.
    assert re.search(r"^table1:\nvariant .*\nbase .*\nmine ", printed, re.MULTILINE), printed[:2000]
    assert "median |curvature| per image: {'base':" in printed
    report = tmp_path / "quickstart_report"
    text = (report / "report.md").read_text()
    assert text.startswith("# ") and "Scorecard" in text and "Figure 2" in text and "Table 1" in text
    assert (report / "report.html").is_file() and (report / "results" / "scorecard" / "result.json").is_file()
    image = [o for o in notebook.cells[-1].outputs if "image/png" in o.get("data", {})]
    assert image, "the last cell shows the boundary figure"


def from_python_blocks(markdown: str, heading: str) -> list[str]:
    """The ```python blocks of the section whose heading contains ``heading``, up to the next heading
    of its level or above (a ``#`` line inside a code block is a comment, not a heading)."""
    blocks: list[str] = []
    level: int | None = None
    inside, language, lines = False, "", []
    for line in markdown.splitlines():
        if line.startswith("```"):
            if not inside:
                inside, language, lines = True, line[3:].strip(), []
            else:
                inside = False
                if level is not None and language == "python":
                    blocks.append("\n".join(lines) + "\n")
            continue
        if inside:
            lines.append(line)
            continue
        found = re.match(r"^(#+) ", line)
        if found:
            depth = len(found.group(1))
            if level is not None and depth <= level:
                break
            if level is None and heading in line:
                level = depth
    return blocks


def test_the_from_python_block_is_the_same_in_the_readme_and_the_api_docs() -> None:
    api = from_python_blocks((REPO / "docs" / "API.md").read_text(), "Quick start")
    readme = from_python_blocks((REPO / "README.md").read_text(), "From Python")
    assert len(api) == 1, "docs/API.md's Quick start holds the README's From Python block"
    assert readme in ([], api), "README.md's From Python block and docs/API.md's Quick start differ"


@pytest.mark.slow
def test_the_from_python_block_runs_as_written_in_a_fresh_folder(tmp_path: Path) -> None:
    blocks = from_python_blocks((REPO / "README.md").read_text(), "From Python") or from_python_blocks((REPO / "docs" / "API.md").read_text(), "Quick start")
    assert blocks
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, env=_fresh_environment(),
                            capture_output=True, text=True, timeout=1800)
    print(f"the From Python block ran in {time.monotonic() - began:.1f} s:\n{result.stdout}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hessian_norm:" in result.stdout and "robust_accuracy:" in result.stdout
    report = Path(result.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert report == tmp_path / "my_report" / "report.md" and "Figure 2" in report.read_text()
    assert (tmp_path / "artifacts" / "digits" / "smallcnn" / "aliases.json").is_file()  # the store, where the CLI keeps it
