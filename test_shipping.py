"""Shipping: the Containerfile and the systemd unit, checked as far as this machine allows.

There is no container engine here, so the Containerfile's instructions are replayed on this
machine in order: the same pip install into a fresh environment, the same environment, working
directory and command line; the result must serve /healthz and pass the HEALTHCHECK command.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, free_port, http_ok, require_tools, stop_process, wait_until


def containerfile():
    """[(INSTRUCTION, argument text)] with continuation lines joined."""
    text = (REPO / "Containerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def instructions(name):
    return [arg for instruction, arg in containerfile() if instruction == name]


def exec_form(arg):
    """The argument of an exec-form (JSON array) instruction."""
    return json.loads(arg)


def parse_env(args):
    env = {}
    for arg in args:
        for pair in shlex.split(arg):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def test_containerfile_is_small_pinned_and_non_root():
    [base] = instructions("FROM")
    assert re.fullmatch(r"\S+/python:3\.\d+\.\d+-slim-\w+", base), base
    copies = [arg.split()[0] for arg in instructions("COPY")]
    assert sorted(copies) == ["kokoa.py", "requirements.txt", "static/"]
    order = [instruction for instruction, _ in containerfile()]
    assert order.index("USER") > max(i for i, name in enumerate(order) if name == "RUN")
    assert instructions("USER") == ["kokoa"]
    assert instructions("EXPOSE") == ["8080"]
    assert exec_form(instructions("VOLUME")[0]) == ["/data"]
    assert parse_env(instructions("ENV"))["KOKOA_LISTEN"] == "0.0.0.0:8080"
    assert any("/healthz" in arg for arg in instructions("HEALTHCHECK"))
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9-]+==[0-9.]+", line), line
    names = {line.split("==")[0] for line in (REPO / "requirements.txt").read_text()
             .splitlines() if "==" in line}
    assert names == {"cryptography", "waitress"}


def replay_paths(text, app, data):
    return text.replace("/app/", f"{app}/").replace("/data/", f"{data}/")


def test_containerfile_instructions_reproduce_a_working_server(tmp_path):
    """Same pip install, same environment, same command line; serves and is healthy."""
    app, data, venv = tmp_path / "app", tmp_path / "data", tmp_path / "venv"
    app.mkdir()
    data.mkdir(mode=0o700)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOKOA_", "WIREGUARD_"))}
    env["PATH"] = f"{venv}/bin:{env['PATH']}"
    env.update({key: replay_paths(value + "/", app, data).rstrip("/")
                for key, value in parse_env(instructions("ENV")).items()})
    port = free_port()
    env["KOKOA_LISTEN"] = f"127.0.0.1:{port}"     # loopback only in tests
    workdir = app
    for instruction, arg in containerfile():
        if instruction == "WORKDIR":
            workdir = app if arg == "/app" else data
        elif instruction == "COPY":
            source, target = arg.split()
            target = replay_paths(target, app, data)
            if source.endswith("/"):
                shutil.copytree(REPO / source, target)
            else:
                shutil.copy(REPO / source, target)
        elif instruction == "RUN" and arg.startswith("pip "):
            subprocess.run(replay_paths(arg, app, data), shell=True, cwd=workdir, env=env,
                           check=True, timeout=600)
    command = [replay_paths(part, app, data) for part in exec_form(instructions("CMD")[0])]

    refused = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0 and "WIREGUARD_KEY_ENC_SECRET" in refused.stderr

    init = subprocess.run(command[:-1] + ["init"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30,
                   what="the replayed container command")
        health = exec_form(instructions("HEALTHCHECK")[0].split("CMD", 1)[1].strip())
        health = [part.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for part in health]
        assert subprocess.run(health, env=env, timeout=30).returncode == 0
        assert (data / "kokoa.db").exists()
    finally:
        stop_process(proc)


@pytest.fixture
def unit_with_local_python(tmp_path):
    """contrib/kokoa.service with ExecStart's interpreter pointed at one that exists here."""
    text = (REPO / "contrib" / "kokoa.service").read_text()
    path = tmp_path / "kokoa.service"
    path.write_text(text.replace("/opt/kokoa/.venv/bin/python", os.path.realpath(sys.executable)))
    return path


def test_systemd_unit_verifies_and_is_hardened(unit_with_local_python):
    require_tools("systemd-analyze")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit_with_local_python)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                               str(unit_with_local_python)], capture_output=True, text=True,
                              timeout=60)
    level = re.search(r"Overall exposure level for kokoa.service: ([\d.]+)", security.stdout)
    assert level and float(level.group(1)) <= 2.0, security.stdout[-2000:]
    text = unit_with_local_python.read_text()
    for setting in ("DynamicUser=yes", "ProtectSystem=strict", "StateDirectory=kokoa",
                    "NoNewPrivileges=yes"):
        assert setting in text


def test_agent_units_from_install_edge_verify(kokoa_server, tmp_path):
    """install-edge.sh writes the agent's .service + .timer; systemd accepts them."""
    require_tools("systemd-analyze", "jq", "curl", "openssl", "flock")
    root = tmp_path / "root"
    (root / "etc/nginx").mkdir(parents=True)
    (root / "etc/nginx/nginx.conf").write_text("events {}\nhttp {\n}\n")
    env = {"PATH": os.environ["PATH"], "KOKOA_BOOTSTRAP_TOKEN": kokoa_server.bootstrap_token,
           "WG_INTERFACE": "none"}
    result = subprocess.run(
        ["bash", str(REPO / "install-edge.sh"), "--root", str(root), "--no-packages",
         "--no-run", "--init", "systemd", "--control-plane", kokoa_server.url,
         "--email", "ops@example.com", "--name", "edge-units"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    units = root / "etc/systemd/system"
    service, timer = units / "kokoa-edge-agent.service", units / "kokoa-edge-agent.timer"
    verify = subprocess.run(["systemd-analyze", "verify", str(service), str(timer)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert "RandomizedDelaySec=" in timer.read_text()
    assert "--env-file" in service.read_text() and not (root / "etc/cron.d").exists()
    drop_in = (root / "etc/systemd/system/nginx.service.d/kokoa.conf").read_text()
    assert "ExecStartPre=-" in drop_in and drop_in.rstrip().endswith(" recover")
