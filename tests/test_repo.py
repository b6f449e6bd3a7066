"""The README's two fresh-machine commands stay true: CI runs exactly the test command."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"^    (\S.*)$", text.split("## ")[0], flags=re.M)


def test_readme_opens_with_pipeline_and_test_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("dvc repro") and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert readme_commands()[1] in ci_lines


def test_lock_pins_torch_for_cpu_installs():
    lock = (REPO / "requirements.lock").read_text()
    assert re.search(r"^torch==2\.13\.0$", lock, flags=re.M)
    assert "nvidia-" not in lock


def test_no_constant_is_defined_twice_in_the_package():
    """A module-level name bound to a literal string or tuple has one definition; other modules import it."""
    import ast
    import collections

    where = collections.defaultdict(list)
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                if isinstance(value, (str, tuple)) and value:
                    where[repr(value)].append(f"{path.relative_to(REPO)}:{node.targets[0].id}")
    assert not {v: w for v, w in where.items() if len(w) > 1}
