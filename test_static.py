"""Static checks are tests too: ruff on the Python, shellcheck and bash -n on the shell."""

import importlib.util
import re
import subprocess
import sys

import kokoa
from conftest import REPO, require, require_tools


def tracked(*patterns):
    """Files of the repository (tracked or new, not ignored) matching git pathspecs."""
    result = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             "--", *patterns], cwd=REPO, capture_output=True, text=True,
                            timeout=30, check=True)
    return [line for line in result.stdout.splitlines() if (REPO / line).is_file()]


def shell_scripts():
    return tracked("*.sh", ".ci/run", ".ci/install-deps")


def test_python_passes_ruff():
    require(importlib.util.find_spec("ruff") is not None, "ruff is not installed")
    files = tracked("*.py")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             "--select", "E,F,W,B,I,N", "--line-length", "100", *files],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_imports_a_test_module():
    """STYLE.md J3: tests import helpers (conftest.py, netlab.py, kokoa), never other tests."""
    files = sorted(set(tracked("*.py", "bench/*.py")))
    assert "bench/agent.py" in files and "test_static.py" in files
    importing = re.compile(r"^\s*(from|import) test_")
    found = [f"{name}:{number}: {line.strip()}" for name in files
             for number, line in enumerate((REPO / name).read_text().splitlines(), start=1)
             if importing.match(line)]
    assert found == []


def test_shell_scripts_pass_shellcheck_and_bash_n():
    require_tools("shellcheck")
    scripts = shell_scripts()
    assert scripts
    for script in scripts:
        syntax = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True,
                                text=True, timeout=30)
        assert syntax.returncode == 0, syntax.stderr
    result = subprocess.run(["shellcheck", "-x", "-o", "check-set-e-suppressed", *scripts],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout


def test_kokoa_sections_are_in_the_house_order():
    banners = re.findall(r"^# (.*?) #{4,}$", (REPO / "kokoa.py").read_text(), re.M)
    assert banners == ["Configuration & constants", "Errors", "Utilities",
                       "Crypto (tokens, secrets)", "Database (connect, migrations, queries)",
                       "Domain logic", "nginx config generator",
                       "HTTP plumbing (request, routing, responses)", "API routes", "Static UI",
                       "CLI"]


def test_every_route_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for entry in kokoa.ROUTES:
        documented = re.sub(r"<(?:int:)?(\w+)>", r"{\1}", entry.pattern)
        assert f"`{entry.method} {documented}`" in readme, f"{entry.method} {documented}"


def shell_array(script, name):
    """The words of a bash array assignment `NAME=(...)` (possibly over several lines)."""
    text = (REPO / script).read_text()
    match = re.search(rf"^{name}=\(([^)]*)\)", text, re.M)
    assert match, f"{script} has no {name}=(...)"
    return match.group(1).split()


def test_install_edge_knows_every_setting_of_the_agent_and_no_other():
    """edge.env is written by install-edge.sh and read by agent.sh: one list, proved equal."""
    assert shell_array("install-edge.sh", "ENV_KEYS") == shell_array("agent.sh", "SETTINGS")
    assert set(shell_array("install-edge.sh", "PASS_THROUGH")) <= set(
        shell_array("agent.sh", "SETTINGS"))
