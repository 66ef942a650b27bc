""".ci/run runs exactly the README's test command, after the README's install steps (the developers' guide's rule):
read from both files, so a change to one of them that is not made to the other fails here."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    """The command lines of the README's opening bash block (comments dropped)."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _ci_commands() -> list[str]:
    return [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_the_readmes_test_command_after_its_install_steps():
    readme = _readme_commands()
    tests = [c for c in readme if "pytest" in c]
    assert len(tests) == 1, f"the README's opening block should hold one test command, found {tests}"
    install, test = (part.strip() for part in tests[0].split("&&"))
    extras = re.fullmatch(r'pip install -e "\.\[([\w,]+)\]"', install)
    assert extras, f"the README's test command should start with pip install -e \".[extras]\", got {install!r}"
    torch_pin = re.search(r"pip install (torch==[\w.+]+)", readme[0])
    assert torch_pin, f"the README's first command should pin torch, got {readme[0]!r}"

    ci = _ci_commands()
    assert test in ci, f".ci/run should run {test!r} as one line, exactly as the README says"
    installs = [c for c in ci if re.match(r"python -m pip install .*-e ", c)]
    assert installs and all(re.search(rf'-e "\.\[{extras.group(1)}\]"', c) for c in installs), \
        f".ci/run should install the README's extras [{extras.group(1)}]: {installs}"
    assert any(re.fullmatch(rf"python -m pip install -q {re.escape(torch_pin.group(1))}", c) for c in ci), \
        f".ci/run should install {torch_pin.group(1)} first, as the README does"
    order = [ci.index(c) for c in (installs[0], test)]
    assert order == sorted(order), ".ci/run should install before it tests"
