"""Slow-connection attack on the control plane: do edges keep polling normally?

Starts `kokoa.py init` + `kokoa.py serve` in a temp dir on a free loopback port, registers an
edge with the bootstrap token, and measures the latency of 304 polls (GET
/api/v1/edge-nodes/me/config with If-None-Match, a new connection each, as agent.sh's curl
does) twice: without attack, then while an attacker process holds --conns slow connections
from --attack-source (each sends a partial request, then one byte every 2-5 s; a connection
the server closes is reopened at its next tick). Prints p50/p99 of both and the ratio, and
how long the server let each attack connection live.

PASS needs: no failed poll under attack, p99(attack) <= 3 x p99(baseline), and every attack
connection closed by the server within --deadline + --slack seconds of its connect.

Usage: python bench/slowloris.py [--kokoa PATH] [--conns 1000] [--polls 300]
         [--mode headers|blank|body|idle] [--spread N] [--deadline 10]
Only loopback is used; every process started is stopped by pid; every loop is bounded.
"""

import argparse
import errno
import http.client
import json
import os
import random
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conftest import cpu_seconds, free_port, send_request, stop_process  # noqa: E402

PY = sys.executable
PARTIAL = b"GET /api/v1/edge-nodes/me/config HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def pct(values, q):
    """The q-th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# The attacker (a separate process, so its work does not share the poller's GIL) ############

def attacker(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.conns + 256)), hard))
    sources = ([args.attack_source] if args.spread <= 1 else
               [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(args.spread)])
    sel = selectors.DefaultSelector()
    rng = random.Random(1)
    slots = [{"sock": None, "next": 0.0} for _ in range(args.conns)]
    stats = {"attempts": 0, "connected": 0, "closed_by_server": 0, "connect_errors": 0,
             "lifetimes": [], "open_samples": []}
    start = time.monotonic()
    end = start + args.duration
    ready_sent = False
    next_sample = start
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

    def trickle(slot, now):
        if args.mode == "headers":
            data = b"a"
        elif args.mode == "blank":
            data = b"\r\n"[slot["sent"] % 2:slot["sent"] % 2 + 1]
        elif args.mode == "body":
            data = b"x"
        else:
            data = b""
        if data:
            try:
                slot["sock"].send(data)
                slot["sent"] += 1
            except OSError:
                pass                        # the close shows up as readable
        slot["next"] = now + rng.uniform(2, 5)

    def opened(slot, now):
        slot["connected_at"] = now
        stats["connected"] += 1
        first = {"headers": PARTIAL, "blank": b"\r\n", "idle": b"",
                 "body": PARTIAL + b"a\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n"}[args.mode]
        try:
            if first:
                slot["sock"].send(first)
        except OSError:
            pass
        slot["sent"] = 0
        slot["next"] = now + rng.uniform(2, 5)
        sel.modify(slot["sock"], selectors.EVENT_READ, slot)

    def closed(slot, now, by_server):
        if by_server and "connected_at" in slot:
            stats["closed_by_server"] += 1
            stats["lifetimes"].append(round(now - slot["connected_at"], 3))
        sel.unregister(slot["sock"])
        slot["sock"].close()
        slot["sock"] = None
        slot.pop("connected_at", None)
        slot["next"] = now + (rng.uniform(2, 5) if args.reconnect else 1e9)

    while time.monotonic() < end and not stopping:
        now = time.monotonic()
        for i, slot in enumerate(slots):
            if (slot["sock"] is None and now >= slot["next"]
                    and stats["attempts"] < args.max_attempts):
                sock = socket.socket()
                sock.setblocking(False)
                sock.bind((sources[i % len(sources)], 0))
                stats["attempts"] += 1
                err = sock.connect_ex(("127.0.0.1", args.port))
                slot["sock"] = sock
                sel.register(sock, selectors.EVENT_WRITE, slot)
                slot["pending_since"] = now
                if err not in (0, errno.EINPROGRESS):
                    stats["connect_errors"] += 1
                    closed(slot, now, False)
            elif slot["sock"] is not None and "connected_at" in slot and now >= slot["next"]:
                trickle(slot, now)
        for key, _ in sel.select(timeout=0.2):
            slot = key.data
            now = time.monotonic()
            if "connected_at" not in slot:
                if slot["sock"].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    stats["connect_errors"] += 1
                    closed(slot, now, False)
                else:
                    opened(slot, now)
                continue
            try:
                data = slot["sock"].recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                closed(slot, now, True)
        now = time.monotonic()
        if not ready_sent and stats["attempts"] >= args.conns:
            print(json.dumps({"ready": True}), flush=True)
            ready_sent = True
        if now >= next_sample:
            stats["open_samples"].append(
                (round(now - start, 1), sum(1 for s in slots if "connected_at" in s)))
            next_sample = now + 5
    now = time.monotonic()
    ages = [now - s["connected_at"] for s in slots if "connected_at" in s]
    stats["open_at_end"] = len(ages)
    stats["oldest_open_at_end"] = round(max(ages), 1) if ages else 0.0
    for slot in slots:
        if slot["sock"] is not None:
            slot["sock"].close()
    print(json.dumps(stats), flush=True)
    return 0


# The poller and the harness ##################################################################

def request(port, method, path, body=None, headers=None, source="127.0.0.1", timeout=5.0):
    """conftest.send_request on this loopback port."""
    return send_request(f"http://127.0.0.1:{port}", method, path, body or b"", headers,
                        source, timeout)


def poll_phase(args, port, token, etag, label, budget):
    """--polls 304 polls, one every --interval s; stops early after --max-failures failures
    or `budget` seconds. Returns (latencies of the 304s, failure descriptions)."""
    headers = {"Authorization": f"Bearer {token}", "If-None-Match": etag}
    latencies, failures = [], []
    deadline = time.monotonic() + budget
    for _ in range(args.polls):
        if time.monotonic() > deadline or len(failures) >= args.max_failures:
            break
        began = time.perf_counter()
        try:
            status, _, _ = request(port, "GET", "/api/v1/edge-nodes/me/config",
                                   headers=headers, source=args.poll_source,
                                   timeout=args.poll_timeout)
        except (OSError, http.client.HTTPException) as err:
            failures.append(f"{type(err).__name__}: {err}")
        else:
            if status == 304:
                latencies.append(time.perf_counter() - began)
            else:
                failures.append(f"status {status}")
        time.sleep(max(0.0, args.interval - (time.perf_counter() - began)))
    ms = [1000 * v for v in latencies]
    if ms:
        print(f"{label}: {len(ms)} x 304, p50 {pct(ms, 50):.2f} ms, p99 {pct(ms, 99):.2f} ms, "
              f"max {max(ms):.2f} ms; {len(failures)} failed"
              + (f" (first: {failures[0]})" if failures else ""))
    else:
        print(f"{label}: no 304 at all; {len(failures)} failed (first: {failures[0]})")
    return ms, failures


def attack_phase(args, port, token, etag, server, round_no):
    """Polls while the attacker runs; returns (latencies, failures, attacker stats)."""
    attack = subprocess.Popen(
        [PY, __file__, "--attacker", "--port", str(port), "--conns", str(args.conns),
         "--mode", args.mode, "--spread", str(args.spread), "--attack-source",
         args.attack_source, "--duration", str(2 * args.budget + args.attack_seconds),
         "--max-attempts", str(args.max_attempts)]
        + ([] if args.reconnect else ["--no-reconnect"]),
        stdout=subprocess.PIPE, text=True)
    try:
        attack_start = time.monotonic()
        if not attack.stdout.readline():        # the attacker's first line: all conns opened
            raise SystemExit("the attacker died")
        time.sleep(2)
        fds = len(os.listdir(f"/proc/{server.pid}/fd"))
        cpu0, acpu0 = cpu_seconds(server.pid), cpu_seconds(attack.pid)
        where = (f"{args.spread} addresses" if args.spread > 1 else args.attack_source)
        ms, failed = poll_phase(args, port, token, etag, f"round {round_no} under attack "
                                f"({args.conns} {args.mode} conns from {where})", args.budget)
        print(f"  server CPU during attack polls: {cpu_seconds(server.pid) - cpu0:.2f} s "
              f"(attacker's {cpu_seconds(attack.pid) - acpu0:.2f} s); server fds 2 s into "
              f"the attack: {fds}")
        if attack.poll() is not None:
            print("  the attacker ended before the polls did: not all polls were under attack")
            failed.append("attacker ended early")
        time.sleep(max(0.0, attack_start + args.attack_seconds - time.monotonic()))
        attack.send_signal(signal.SIGTERM)      # the attacker reports and exits
        out, _ = attack.communicate(timeout=30)
        return ms, failed, (json.loads(out.strip().splitlines()[-1]) if out.strip() else {})
    finally:
        if attack is not None:
            stop_process(attack)


def judge(args, stats):
    """Print the attacker's figures; [(verdict, ok)] on the server's closing its conns."""
    if not stats:
        return [("attacker reported", False)]
    life = stats["lifetimes"]
    limit = args.deadline + args.slack
    late = [v for v in life if v > limit]
    print(f"  attacker: {stats['attempts']} connects, {stats['connected']} connected, "
          f"{stats['connect_errors']} connect errors, {stats['closed_by_server']} closed by the "
          f"server; open over time (s, n): {stats['open_samples']}")
    if life:
        print(f"  lifetime of server-closed attack conns: p50 {pct(life, 50):.1f} s, max "
              f"{max(life):.1f} s; {sum(v < 1 for v in life)} closed within 1 s (refused over "
              f"the cap), {len(late)} after {limit:.0f} s")
    print(f"  still open at the end: {stats['open_at_end']}, oldest "
          f"{stats['oldest_open_at_end']} s")
    return [(f"attack conns closed within {limit:.0f} s", stats["closed_by_server"] > 0
             and not late and stats["oldest_open_at_end"] <= limit)]


def harness(args):
    work = Path(tempfile.mkdtemp(prefix="slowloris-"))
    server = None
    try:
        env_file = work / "kokoa.env"
        subprocess.run([PY, args.kokoa, "init", "--env-file", str(env_file)], check=True,
                       cwd=work, stdout=subprocess.DEVNULL, timeout=30)
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
        port = free_port()
        log = open(work / "serve.log", "wb")
        server = subprocess.Popen(
            [PY, args.kokoa, "serve", "--env-file", str(env_file), "--db", str(work / "k.db"),
             "--listen", f"127.0.0.1:{port}", "--threads", str(args.threads)],
            cwd=work, stdout=log, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("KOKOA_")})
        log.close()
        for _ in range(200):
            try:
                if request(port, "GET", "/healthz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None:
                raise SystemExit((work / "serve.log").read_text())
            time.sleep(0.1)
        else:
            raise SystemExit("kokoa serve did not answer /healthz within 20 s")
        body = json.dumps({"bootstrap_token": env["KOKOA_BOOTSTRAP_TOKEN"],
                           "name": "edge1"}).encode()
        status, _, data = request(port, "POST", "/api/v1/edge-nodes/register", body,
                                  {"Content-Type": "application/json"})
        assert status == 201, (status, data)
        token = json.loads(data)["token"]
        status, headers, _ = request(port, "GET", "/api/v1/edge-nodes/me/config",
                                     headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and headers["ETag"], status
        etag = headers["ETag"]
        limits = Path(f"/proc/{server.pid}/limits").read_text()
        soft, hard = limits.split("Max open files")[1].split()[:2]
        print(f"kokoa {args.kokoa} on 127.0.0.1:{port}; polls from {args.poll_source}; "
              f"server open-file limit soft {soft} hard {hard}")

        for _ in range(20):                     # warm-up: token cache, code paths
            request(port, "GET", "/api/v1/edge-nodes/me/config", source=args.poll_source,
                    headers={"Authorization": f"Bearer {token}", "If-None-Match": etag})
        base, under, under_fail, verdicts = [], [], [], []
        for round_no in range(1, args.rounds + 1):
            cpu0 = cpu_seconds(server.pid)
            ms, _ = poll_phase(args, port, token, etag, f"round {round_no} baseline",
                               args.budget)
            base += ms
            print(f"  server CPU during baseline polls: {cpu_seconds(server.pid) - cpu0:.2f} s")
            ms, failed, stats = attack_phase(args, port, token, etag, server, round_no)
            under += ms
            under_fail += failed
            verdicts += judge(args, stats)
            if failed and not ms:
                break                           # every poll failed: no point in another round
        if args.rounds > 1 and base:
            print(f"all rounds: baseline p50 {pct(base, 50):.2f} ms p99 {pct(base, 99):.2f} ms "
                  f"({len(base)}); under attack "
                  + (f"p50 {pct(under, 50):.2f} ms p99 {pct(under, 99):.2f} ms ({len(under)})"
                     if under else "nothing"))
        if base and under:
            ratio = pct(under, 99) / pct(base, 99)
            print(f"p99 ratio attack/baseline: {ratio:.2f} (limit 3)")
            verdicts.append(("p99 within 3x", ratio <= 3))
        verdicts.append(("no failed poll under attack", bool(under) and not under_fail))
        serve_alive = server.poll() is None
        verdicts.append(("server still running", serve_alive))
        for name, ok in verdicts:
            print(f"  {'PASS' if ok else 'FAIL'}: {name}")
        if not serve_alive:
            print((work / "serve.log").read_text()[-3000:])
        return 0 if all(ok for _, ok in verdicts) else 1
    finally:
        if server is not None:
            stop_process(server)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kokoa", default=str(REPO / "kokoa.py"))
    parser.add_argument("--conns", type=int, default=1000, help="attack connections")
    parser.add_argument("--mode", choices=("headers", "blank", "body", "idle"),
                        default="headers", help="what each attack conn trickles")
    parser.add_argument("--attack-source", default="127.0.0.1")
    parser.add_argument("--spread", type=int, default=1,
                        help="attack from this many addresses 127.0.x.y instead")
    parser.add_argument("--poll-source", default="127.0.0.2")
    parser.add_argument("--polls", type=int, default=300, help="polls per phase")
    parser.add_argument("--rounds", type=int, default=2,
                        help="baseline + attack phases, alternated (the load of the host drifts)")
    parser.add_argument("--interval", type=float, default=0.1, help="s between polls")
    parser.add_argument("--poll-timeout", type=float, default=5.0)
    parser.add_argument("--max-failures", type=int, default=10)
    parser.add_argument("--budget", type=float, default=90.0, help="s per poll phase at most")
    parser.add_argument("--attack-seconds", type=float, default=40.0,
                        help="attack at least this long (longer while polls run)")
    parser.add_argument("--deadline", type=float, default=10.0,
                        help="the server's deadline for this --mode (body: 30)")
    parser.add_argument("--slack", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-attempts", type=int, default=100000)
    parser.add_argument("--no-reconnect", dest="reconnect", action="store_false")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--attacker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    return attacker(args) if args.attacker else harness(args)


if __name__ == "__main__":
    sys.exit(main())
