"""The documents point at things that exist: every test the README's bad-input table cites, every
file the README and docs/DESIGN.md name, and every config option the README's commands pick.

Cheap: it reads files and runs nothing. ``tests/test_rehearse.py`` runs the README's commands.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
DESIGN = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
EXPERIMENTS_README = (REPO / "experiments" / "README.md").read_text(encoding="utf-8")

# Config groups a command picks an option of with `group=option`.
GROUPS = ("experiment", "recipe", "regularizer", "dataset", "model", "trainer", "attack", "probe", "logger", "debug", "report", "callbacks", "paths")


def section(markdown: str, heading: str) -> str:
    """The text under the first heading that contains ``heading``, up to the next heading of its
    level or above (``#`` lines inside code blocks are comments, not headings)."""
    lines, level, inside = [], None, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            inside = not inside
        found = None if inside else re.match(r"^(#+) ", line)
        if found:
            if level is not None and len(found.group(1)) <= level:
                break
            if level is None and heading in line:
                level = len(found.group(1))
                continue
        if level is not None:
            lines.append(line)
    assert level is not None, f"no heading containing {heading!r}"
    return "\n".join(lines)


def bad_input_rows() -> list[tuple[str, list[str]]]:
    """(the row's first cell, the test nodes its last cell cites) for each row of the bad-input
    table. A cited node ``::name`` right after ``path::other`` is in the same file."""
    rows = []
    for line in section(README, "Bad input").splitlines():
        if not line.startswith("| ") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == "bad input":  # the header
            continue
        nodes, path = [], None
        for ref in re.findall(r"`([^`]*::[^`]*)`", cells[-1]):
            if ref.startswith("::"):
                assert path is not None, f"{ref} follows no path in the row {cells[0]!r}"
                ref = path + ref
            path = ref.split("::", 1)[0]
            nodes.append(ref)
        rows.append((cells[0], nodes))
    return rows


def test_every_bad_input_row_cites_a_test() -> None:
    rows = bad_input_rows()
    assert len(rows) >= 60, f"the bad-input table has only {len(rows)} rows"
    uncited = [first for first, nodes in rows if not nodes]
    assert not uncited, f"rows without a test: {uncited}"


def _missing_node(node: str) -> str | None:
    """Why ``tests/x.py::[Class::]test[param]`` does not name a test, or None when it does."""
    path, *names = node.split("::")
    file = REPO / path
    if not (path.startswith("tests/") and path.endswith(".py") and file.is_file()):
        return f"{node}: no file {path}"
    text = file.read_text(encoding="utf-8")
    names = [re.sub(r"\[.*\]$", "", name) for name in names]  # a parametrised id
    if len(names) == 2 and not re.search(rf"^class {re.escape(names[0])}\b", text, re.M):
        return f"{node}: no class {names[0]} in {path}"
    if len(names) not in (1, 2) or not re.search(rf"^\s*def {re.escape(names[-1])}\(", text, re.M):
        return f"{node}: no test {names[-1]} in {path}"
    if not names[-1].startswith("test"):
        return f"{node}: {names[-1]} is not a test pytest collects"
    return None


def test_every_test_the_bad_input_table_cites_exists() -> None:
    missing = [why for _, nodes in bad_input_rows() for node in nodes if (why := _missing_node(node))]
    assert not missing, "\n".join(missing)


def _project_folder(name: str) -> bool:
    """A folder of this project's own (``conf``, ``tests``, ``geometry``): a folder path that starts
    elsewhere (``train/`` of an image folder, ``outputs/``) names what a user or a run makes."""
    return name not in {"outputs", "artifacts", "data", "models", "wandb", "multirun"} and any(
        (root / name).is_dir() for root in (REPO, REPO / "robustness", REPO / "tests"))


def _backticked_paths(markdown: str) -> list[str]:
    """Backticked file and folder paths of the project (``conf/x.yaml``, ``geometry/walk.py:name``,
    ``store.py``, ``tests/``), placeholders (``NAME``, ``<dataset>``, ``*``, ``{a,b}``) left out."""
    found = []
    for token in re.findall(r"`([^`\s]+)`", markdown):
        token = token.rstrip(",.;")
        if "::" in token:  # a test node: test_every_test_the_bad_input_table_cites_exists checks those
            continue
        path = token.split(":", 1)[0]
        if re.search(r"[<>*{}]|NAME|\.\.\.", path) or "=" in path or path.startswith(("http", "-", "/", "~", ".pytest")):
            continue
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)*\.(py|yaml|md|ipynb|toml|json|cfg)", path) and ("/" in path or path.endswith(".py")):
            found.append(token)
        elif re.fullmatch(r"[\w.-]+(/[\w.-]+)*/", path) and _project_folder(path.split("/")[0]):
            found.append(token)
    return found


def _resolve(path: str, roots: list[Path]) -> Path | None:
    for root in roots:
        if (root / path).exists():
            return root / path
    return None


# Files that a run writes (named in the documents' prose, not part of the project).
WRITTEN = {"model.pt", "meta.json", "config.yaml", "metrics.json", "aliases.json", "report.md", "report.html", "scorecard.csv", "scorecard.md",
           "sweep_summary.csv", "sweep_summary.md", "result.json", "leaderboard.csv", "leaderboard.md", "run.log"}


@pytest.mark.parametrize("document", ["README.md", "docs/DESIGN.md", "experiments/README.md"])
def test_every_path_a_document_names_exists(document: str) -> None:
    text = (REPO / document).read_text(encoding="utf-8")
    roots = [REPO, REPO / "robustness", REPO / "tests", REPO / "conf"]
    missing = []
    for token in _backticked_paths(text):
        path, _, name = token.partition(":")
        if Path(path).name in WRITTEN:
            continue
        file = _resolve(path, roots)
        if file is None:
            missing.append(f"{token}: no such file or folder")
        elif name and file.suffix == ".py":
            # `module.py:name` names something the module defines.
            first = re.match(r"\w*", name).group(0)
            if not re.search(rf"^\s*(def|class) {re.escape(first)}\b|^{re.escape(first)}\s*[:=]", file.read_text(encoding="utf-8"), re.M):
                missing.append(f"{token}: {path} defines no {first}")
    assert not missing, f"{document}:\n" + "\n".join(missing)


def test_the_path_finder_sees_the_documents_paths() -> None:
    """The check above is not empty: it finds the paths these documents are known to name."""
    assert {"conf/report/seed.yaml", "docs/API.md", "examples/quickstart.ipynb"} <= set(_backticked_paths(README))
    assert "robustness/probes/NAME.py" not in _backticked_paths(DESIGN) and "tests/test_adding_components.py" in _backticked_paths(DESIGN)
    assert _resolve("no/such/file.py", [REPO]) is None


def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", markdown, re.S)


@pytest.mark.parametrize("document", ["README.md", "experiments/README.md"])
def test_every_option_a_command_picks_exists(document: str) -> None:
    """`group=option` in a document's commands (code blocks and backticked commands) names a file
    of that config group: a renamed or deleted option fails here, not in a user's shell."""
    text = (REPO / document).read_text(encoding="utf-8")
    commands = [line for block in _code_blocks(text) for line in block.splitlines()]
    commands += [c for c in re.findall(r"`([^`]*python -m robustness[^`]*)`", text)]
    pick = re.compile(rf"(?<![\w./+])({'|'.join(GROUPS)}|hydra/launcher)=([a-z0-9_]+)\b")
    picks = {(group, option) for command in commands for group, option in pick.findall(command)}
    assert ("experiment", "train") in picks or document != "README.md"
    missing = sorted(f"{group}={option}" for group, option in picks if not (REPO / "conf" / group / f"{option}.yaml").is_file())
    assert not missing, f"{document} picks options that do not exist: {missing}"


def test_every_experiment_file_is_listed_in_experiments_readme() -> None:
    listed = set(re.findall(r"experiment=([a-z0-9_]+)", EXPERIMENTS_README))
    files = {p.stem for p in (REPO / "experiments").glob("*.yaml")}
    assert files - listed == set(), f"experiments/README.md does not list: {sorted(files - listed)}"


def test_every_regularizer_is_named_in_the_readme() -> None:
    training = section(README, "Training")
    names = {p.stem for p in (REPO / "conf" / "regularizer").glob("*.yaml")}
    absent = sorted(name for name in names if f"`{name}`" not in training)
    assert not absent, f"the README's Training section does not name: {absent}"


def _first_of_each_sweep(override: str) -> str:
    """``key=a,b,c`` -> ``key=a`` (one job of a sweep); lists and dicts keep their commas."""
    key, _, value = override.partition("=")
    if value and value[0] not in "[{'\"" and "," in value:
        value = value.split(",", 1)[0]
    return f"{key}={value}" if _ else override


_ABSENT = object()


def test_every_readme_command_composes() -> None:
    """Each command the README's code blocks show (those test_rehearse runs) composes with Hydra: every
    group option, key and value it sets exists (``retrain=true`` included), without running it."""
    import shlex

    from helpers import compose
    from test_rehearse import readme_commands

    commands = readme_commands()
    assert any("retrain=true" in c for c in commands) and any("dataset=imagefolder" in c for c in commands)
    composed = 0
    for command in commands:
        args = [a for a in shlex.split(command)[3:] if a != "-m"]
        if "--help" in args:
            continue
        # Hydra's own keys (the launcher, its folders) are not part of the composed job config.
        overrides = [_first_of_each_sweep(a) for a in args if not a.startswith(("hydra/", "hydra.", "experiment="))]
        experiment = next((a.split("=", 1)[1] for a in args if a.startswith("experiment=")), "report_digits")
        cfg = compose(experiment, overrides)
        for override in overrides:
            key = override.lstrip("+").split("=", 1)[0]
            if "." in key or key not in GROUPS:  # a key, not a group option: it holds a value now
                assert OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT, f"{command}: {key} is not in the composed config"
        composed += 1
    assert composed >= len(commands) - 1
