"""Benchmark of the edge agent against nginx's own cost, on this machine.

For each size (default 10, 1,000 and 10,000 hostnames) it serves a generated payload from a
control-plane double, runs `agent.sh once` on a fresh private nginx, and prints:

  agent apply    `agent.sh once` wall time (fetch, validate, render, swap, nginx -t, reload signal)
                 plus the wait until nginx's new workers have replaced the old ones
  nginx own      `nginx -t` alone + `nginx -s reload` until the new workers are up, same files
  ratio          agent apply / nginx own   (target <= 2)
  no-change poll median `agent.sh once` wall time when the control plane answers 304 (< 100 ms)

Usage: python3 bench/agent.py [--sizes 10,1000,10000] [--polls 5]
Needs nginx, curl, jq, flock, openssl (root, as the tests). Not part of the test run.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from netlab import ControlPlaneDouble, Edge, make_payload  # noqa: E402


def routes_for(count):
    """`count` hostnames spread over 64 upstreams (nginx never connects during -t/reload)."""
    return {f"host{i:05d}.bench.example.com": f"10.8.{i % 64}.2:8080" for i in range(count)}


def timed(func):
    start = time.monotonic()
    func()
    return time.monotonic() - start


def reload_and_wait(edge):
    old = edge.nginx.workers()
    subprocess.run([str(edge.nginx.wrapper), "-s", "reload"], check=True, capture_output=True,
                   timeout=600)
    wait_for_reload(edge, old)


def nginx_t(edge):
    subprocess.run([str(edge.nginx.wrapper), "-t"], check=True, capture_output=True, timeout=600)


def bench_size(count, polls):
    workdir = Path(tempfile.mkdtemp(prefix="kokoa-bench-", dir="/tmp"))
    workdir.chmod(0o755)
    double = ControlPlaneDouble()
    edge = Edge(workdir, double.url)
    edge.nginx.start()
    try:
        edge.agent("once", check_rc=0)      # first run: fallback certificate, directories
        double.payload = make_payload(routes_for(count))
        old = edge.nginx.workers()
        start = time.monotonic()
        edge.agent("once", check_rc=0, timeout=1800)
        agent_once = time.monotonic() - start
        wait_for_reload(edge, old)
        agent_total = time.monotonic() - start
        t_time = timed(lambda: nginx_t(edge))
        reload_time = timed(lambda: reload_and_wait(edge))
        nginx_total = t_time + reload_time
        poll_times = []
        for _ in range(polls):
            start = time.monotonic()
            proc = edge.agent("once", check_rc=0)
            poll_times.append(time.monotonic() - start)
            assert "config unchanged" in proc.stdout
        return agent_once, agent_total, t_time, reload_time, nginx_total, statistics.median(
            poll_times)
    finally:
        edge.nginx.stop()
        double.close()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_for_reload(edge, old):
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        current = edge.nginx.workers()
        if current and not current & old:
            return
        time.sleep(0.05)
    raise RuntimeError("nginx did not finish reloading")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--polls", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"{'hosts':>6} {'agent once':>11} {'agent apply':>12} {'nginx -t':>9} "
          f"{'reload':>8} {'nginx own':>10} {'ratio':>6} {'no-change poll':>15}")
    for size in (int(s) for s in args.sizes.split(",")):
        once, total, t_time, reload_time, own, poll = bench_size(size, args.polls)
        print(f"{size:>6} {once:>10.2f}s {total:>11.2f}s {t_time:>8.2f}s {reload_time:>7.2f}s "
              f"{own:>9.2f}s {total / own:>6.2f} {poll * 1000:>12.0f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
