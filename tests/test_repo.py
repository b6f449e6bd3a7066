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
