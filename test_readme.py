"""The README's two commands are the product's front door: keep them true."""

import os
import re
import shutil
import signal
import subprocess

from conftest import REPO, free_port, http_ok, require_root, wait_until


def readme_command(section):
    """The first fenced code block of a `## section` of the README."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```\n(.*?)\n```", body, re.S).group(1)


def test_readme_commands_are_single_lines():
    for section in ("Quick start", "Tests"):
        assert "\n" not in readme_command(section).strip()
    assert ".ci/install-deps" in readme_command("Tests")


def test_quick_start_installs_and_serves_the_control_plane(tmp_path):
    """Runs the Quick start line in a copy of the repository; it must end serving /healthz."""
    require_root()
    for name in ("kokoa.py", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "static", tmp_path / "static")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOKOA_", "WIREGUARD_"))}
    env["KOKOA_LISTEN"] = f"127.0.0.1:{port}"       # the real environment wins over defaults
    log = open(tmp_path / "quick-start.log", "wb")
    proc = subprocess.Popen(["bash", "-c", readme_command("Quick start")], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def healthy():
        assert proc.poll() is None, (tmp_path / "quick-start.log").read_text()
        return http_ok(f"http://127.0.0.1:{port}/healthz")
    try:
        wait_until(healthy, timeout=600, interval=0.5, what="the quick start to serve")
        assert (tmp_path / "kokoa.env").stat().st_mode & 0o777 == 0o600
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
