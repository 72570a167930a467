"""Benchmark the edge poll path and the config build of the control plane.

Prints:
  1. 304-poll throughput of GET /api/v1/edge-nodes/me/config with 1,000 routes, as a ratio to a
     bare waitress app returning a fixed 200-byte JSON, measured in the same run with the same
     server thread count and the same load generator (and, without a target, to the same bare
     app on kokoa.make_server, whose loop does not spin while a worker sends: that ratio is the
     app's own cost), for two load generators:
       - wrk (-t2 -c32; if installed), target >= 0.7;
       - a Python client: --client-threads threads, each with one keep-alive
         http.client.HTTPConnection, polling for --duration seconds, target >= 0.8.
     Each run measures the baseline and then kokoa with each client; the ratio is per run
     (machine load drifts), and the medians are printed. Each run also reads the server's CPU
     time per request (/proc/PID/stat), whose ratio is much steadier than throughput on a
     shared 2-core machine (the client competes for the same cores).
  2. The time of the first config build for 10,000 and 100,000 routes (targets < 0.5 s and
     < 5 s) and the server process's peak memory after it (target < 300 MB).

Usage: python bench/poll.py [--duration 5] [--runs 3] [--threads 4] [--client-threads 8]
                            [--skip-poll] [--skip-build]
wrk is optional (apt-get install wrk): without it only the Python client runs. Only loopback
is used.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import kokoa  # noqa: E402
from conftest import (  # noqa: E402
    KokoaServer,
    cpu_seconds,
    free_port,
    http_ok,
    stop_process,
    wait_until,
)

# Run as `python -c BASELINE_APP port threads server`: server "waitress" is bare
# waitress.serve (the target's baseline); "kokoa" is kokoa.make_server with serve's settings
# and logging, which tells the app's own cost from the server's.
BASELINE_APP = '''
import sys, waitress
BODY = (b'{"status":"ok","padding":"' + b"x" * 172 + b'"}')
assert len(BODY) == 200, len(BODY)
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(BODY)))])
    return [BODY]
port, threads = int(sys.argv[1]), int(sys.argv[2])
if sys.argv[3] == "waitress":
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, ident="baseline",
                   _quiet=True)
else:
    sys.path.insert(0, sys.argv[4])
    import kokoa
    kokoa.configure_logging({})
    kokoa.make_server(app, "127.0.0.1", port, threads, **kokoa.WAITRESS_SETTINGS).run()
'''

# Run as `python -c PY_CLIENT port path expected_status threads seconds [header ...]`: prints
# "<requests per second> <responses that closed the connection>". One keep-alive connection per
# thread (http.client reconnects by itself after a response that closes it); every thread stops
# at the deadline, and on the first unexpected status.
PY_CLIENT = '''
import http.client, sys, threading, time
port, path, expected, count, seconds = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                                        int(sys.argv[4]), float(sys.argv[5]))
headers = dict(h.split(": ", 1) for h in sys.argv[6:])
done, closed, errors = [0] * count, [0] * count, []
start = threading.Barrier(count + 1)

def poll(i):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    start.wait(30)
    try:
        while time.perf_counter() < deadline:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != expected:
                errors.append(resp.status)
                return
            done[i] += 1
            closed[i] += resp.will_close
    finally:
        conn.close()

threads = [threading.Thread(target=poll, args=(i,)) for i in range(count)]
for thread in threads:
    thread.start()
deadline = time.perf_counter() + 3600       # set for real once every thread is connected
start.wait(30)
began = time.perf_counter()
deadline = began + seconds
for thread in threads:
    thread.join(seconds + 60)
if errors or any(thread.is_alive() for thread in threads):
    sys.exit(f"unexpected statuses {sorted(set(errors))} or a hung thread")
print(sum(done) / (time.perf_counter() - began), sum(closed))
'''


def populate(db_path, count):
    """Insert one origin and `count` routes straight into a migrated database."""
    db = kokoa.connect(str(db_path))
    kokoa.migrate(db)
    origin_id = kokoa.new_id()
    public = kokoa.b64(kokoa.wg_public_from_private(kokoa.wg_generate_private()))
    with kokoa.transaction(db):
        db.execute("INSERT INTO origins (id, name, name_key, wg_ip, wg_public_key) "
                   "VALUES (?, 'home', 'home', '10.8.0.2', ?)", (origin_id, public))
        db.executemany(
            "INSERT INTO routes (id, hostname, origin_id, target_port) VALUES (?, ?, ?, ?)",
            ((kokoa.new_id(), f"site{i}.example.com", origin_id, 1024 + i % 30000)
             for i in range(count)))
    db.close()


def wrk(url, duration, headers):
    """Requests/s measured by wrk (2 threads, 32 connections)."""
    cmd = ["wrk", "-t2", "-c32", f"-d{duration}s"]
    for header in headers:
        cmd += ["-H", header]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=duration + 60,
                         check=True).stdout
    if re.search(r"Non-2xx or 3xx responses", out):
        raise SystemExit(f"wrk saw errors:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def py_client(url, duration, headers, expected, threads):
    """(requests/s, responses that closed their connection) of the Python client."""
    port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
    out = subprocess.run([sys.executable, "-c", PY_CLIENT, str(port), path, str(expected),
                          str(threads), str(duration), *headers],
                         capture_output=True, text=True, timeout=duration + 120, check=False)
    if out.returncode:
        raise SystemExit(f"python client failed: {out.stderr.strip()}")
    rate, closed = out.stdout.split()
    return float(rate), int(closed)


def start_baseline(threads, server="waitress"):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BASELINE_APP, str(port), str(threads),
                             server, str(REPO)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/"), timeout=20, what="baseline server")
    return proc, f"http://127.0.0.1:{port}/"


def start_kokoa(workdir, routes, threads):
    server = KokoaServer(workdir)    # access log on, as in production
    populate(server.db, routes)
    server.extra_args = ["--threads", str(threads)]
    server.start()
    _, token = server.register_edge("bench-edge")
    return server, token


def cpu_per_request(pid, duration, measure, *call):
    """(what measure(*call) returned, the server's CPU microseconds per request in it, those of
    its main thread: waitress's I/O loop, which reads requests and wakes for answers)."""
    before, loop_before = cpu_seconds(pid), cpu_seconds(pid, thread=pid)
    result = measure(*call)
    requests = result[0] * duration
    return (result, (cpu_seconds(pid) - before) / requests * 1e6,
            (cpu_seconds(pid, thread=pid) - loop_before) / requests * 1e6)


def peak_rss_mb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


BARE, SAME_SERVER, KOKOA = ("bare waitress, fixed 200-byte JSON",
                             "the same app on kokoa.make_server",
                             "kokoa /me/config 304")


def bench_poll(args):
    with tempfile.TemporaryDirectory() as tmp:
        server, token = start_kokoa(Path(tmp), 1000, args.threads)
        baselines = [start_baseline(args.threads, kind) for kind in ("waitress", "kokoa")]
        try:
            status, headers, _ = server.request("GET", "/api/v1/edge-nodes/me/config",
                                                auth=token)
            assert status == 200
            targets = {    # name -> (server pid, url, request headers, expected status)
                BARE: (baselines[0][0].pid, baselines[0][1], [], 200),
                SAME_SERVER: (baselines[1][0].pid, baselines[1][1], [], 200),
                KOKOA: (server.proc.pid, server.url + "/api/v1/edge-nodes/me/config",
                        [f"Authorization: Bearer {token}",
                         f"If-None-Match: {headers['ETag']}"], 304)}
            clients = {}
            if shutil.which("wrk"):
                clients[f"wrk -t2 -c32 -d{args.duration}s"] = (
                    0.7, lambda target, hdrs, status: (wrk(target, args.duration, hdrs), 0))
            clients[f"python http.client, {args.client_threads} threads x 1 keep-alive "
                    f"connection, {args.duration}s"] = (
                0.8, lambda target, hdrs, status: py_client(target, args.duration, hdrs, status,
                                                            args.client_threads))
            for _, measure in clients.values():     # warm-up: connections, caches
                for _, url, hdrs, expected in targets.values():
                    measure(url, hdrs, expected)
            # client -> target -> [(requests/s, closed connections, server CPU us/request,
            #                       of which the I/O loop's)]
            results = {client: {name: [] for name in targets} for client in clients}
            for _ in range(args.runs):
                for client, (_, measure) in clients.items():
                    for name, (pid, url, hdrs, expected) in targets.items():
                        (rps, closed), cpu, loop = cpu_per_request(pid, args.duration, measure,
                                                                   url, hdrs, expected)
                        results[client][name].append((rps, closed, cpu, loop))
        finally:
            server.stop()
            for proc, _ in baselines:
                stop_process(proc)
    print(f"304 poll, 1,000 routes, {args.threads} server threads, {args.runs} runs")
    if "wrk" not in " ".join(clients):
        print("  wrk: not installed (apt-get install wrk), skipped")
    for client, (target, _) in clients.items():
        print(f"  {client}:")
        for name, runs in results[client].items():
            closed = sum(run[1] for run in runs)
            print(f"    {name + ':':40s} median {statistics.median(r[0] for r in runs):6,.0f} "
                  f"req/s, server CPU {statistics.median(r[2] for r in runs):4.0f} us/request "
                  f"({statistics.median(r[3] for r in runs):3.0f} in the I/O loop)"
                  + (f" ({closed:,} responses closed the connection)" if closed else ""))
        for versus, note in ((BARE, f"target >= {target}"),
                             (SAME_SERVER, "the app's own cost; no target")):
            ratios = [ours[0] / base[0] for base, ours
                      in zip(results[client][versus], results[client][KOKOA], strict=True)]
            cpu = [base[2] / ours[2] for base, ours
                   in zip(results[client][versus], results[client][KOKOA], strict=True)]
            print(f"    kokoa / {versus.split(',')[0]}: median {statistics.median(ratios):.2f} "
                  f"(runs: {', '.join(f'{r:.2f}' for r in ratios)}); by CPU per request "
                  f"{statistics.median(cpu):.2f}  {note}")


def bench_build(count):
    """First build in-process, then in a real server process with its peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "kokoa.db"
        populate(db_path, count)
        db = kokoa.connect(str(db_path))
        started = time.perf_counter()
        _, body, _ = kokoa.build_edge_configs(db)[1]
        elapsed = time.perf_counter() - started
        db.close()
        server = KokoaServer(Path(tmp), {"KOKOA_LOG_LEVEL": "WARNING"})
        server.db = db_path
        server.start()
        try:
            _, token = server.register_edge("bench-edge")
            started = time.perf_counter()
            status, _, _ = server.request("GET", "/api/v1/edge-nodes/me/config", auth=token)
            served = time.perf_counter() - started
            assert status == 200
            rss = peak_rss_mb(server.proc.pid)
        finally:
            server.stop()
    return elapsed, served, len(body), rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="server threads, both apps")
    parser.add_argument("--client-threads", type=int, default=8,
                        help="threads (connections) of the Python client")
    parser.add_argument("--skip-poll", action="store_true")
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    if not args.skip_poll:
        bench_poll(args)
    for count, target in () if args.skip_build else ((10_000, 0.5), (100_000, 5.0)):
        build, served, size, rss = bench_build(count)
        print(f"first config build, {count:,} routes: {build:.3f} s in-process "
              f"(target < {target} s); first poll through the server {served:.3f} s; "
              f"payload {size / 1e6:.1f} MB; server peak RSS {rss:.0f} MB (target < 300 MB)")
    print(json.dumps({"python": sys.version.split()[0], "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
