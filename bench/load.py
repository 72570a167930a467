"""Load benchmark: a fleet of simulated edges polls while an admin keeps writing routes.

N simulated edges (asyncio, one fresh connection per poll like the agent's curl) poll
GET /api/v1/edge-nodes/me/config every INTERVAL s with If-None-Match, at random phases, while
an admin creates RATE routes per second for DURATION s. Polling goes on for one more interval
(+1 s) after the last write, so that every write can be seen. Prints:
  - poll latency p50/p99/max, poll counts (200/304) and errors (target 0);
  - the time from a route write (its 201) to every edge having received a config that holds it
    (p50/p99/max over writes; target p99 <= INTERVAL + 1 s).

Usage: python bench/load.py [--edges 1000] [--interval 5] [--duration 60] [--rate 10]
                            [--threads 8] [--concurrency 64]
Starts its own `python kokoa.py serve` on a free loopback port in a temporary directory.
"""

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conftest import KokoaServer  # noqa: E402


def percentile(values, fraction):
    """The nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def http_get(port, path, headers, timeout):
    """GET over a fresh loopback connection; returns (status, headers, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
                     "Connection: close\r\n\r\n".encode("latin-1"))
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


class Fleet:
    """The simulated edges and what they measured."""

    def __init__(self, port, tokens, interval, concurrency):
        self.port = port
        self.tokens = tokens
        self.interval = interval
        self.semaphore = asyncio.Semaphore(concurrency)
        self.latencies = []
        self.statuses = {}
        self.errors = []
        self.timelines = [[] for _ in tokens]    # per edge: (monotonic time, route count)

    async def edge(self, index, end):
        token, etag = self.tokens[index], None
        next_poll = time.monotonic() + random.uniform(0, self.interval)
        while next_poll < end:
            await asyncio.sleep(max(0.0, next_poll - time.monotonic()))
            headers = {"Authorization": f"Bearer {token}"}
            if etag:
                headers["If-None-Match"] = etag
            started = time.monotonic()
            try:
                async with self.semaphore:
                    status, got, body = await http_get(self.port, "/api/v1/edge-nodes/me/config",
                                                       headers, timeout=10)
            except (OSError, asyncio.TimeoutError, ValueError, IndexError) as err:
                self.errors.append(repr(err))
                next_poll += self.interval
                continue
            finished = time.monotonic()
            self.latencies.append(finished - started)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200:
                etag = got.get("etag")
                count = len(json.loads(body)["hostnames"])
                self.timelines[index].append((finished, count))
            elif status != 304:
                self.errors.append(f"HTTP {status}")
            next_poll += self.interval

    async def run(self, end):
        await asyncio.gather(*(self.edge(i, end) for i in range(len(self.tokens))))


def write_routes(server, origin_id, rate, duration, writes, errors):
    """Create `rate` routes a second for `duration` s; record (time of the 201, count)."""
    start = time.monotonic()
    for number in range(int(rate * duration)):
        time.sleep(max(0.0, start + number / rate - time.monotonic()))
        status, _, body = server.request("POST", "/api/v1/routes", {
            "hostname": f"load{number}.example.com", "origin_id": origin_id,
            "target_port": 8000 + number % 1000})
        if status == 201:
            writes.append((time.monotonic(), len(writes) + 1))
        else:
            errors.append(f"route write HTTP {status}: {body}")


def propagation(writes, timelines):
    """For each write: seconds until the last edge had a config holding it (None if never)."""
    delays = []
    for written_at, count in writes:
        worst = 0.0
        for timeline in timelines:
            seen = next((t for t, c in timeline if c >= count), None)
            if seen is None:
                worst = None
                break
            worst = max(worst, seen - written_at)
        delays.append(worst)
    return delays


def register_fleet(server, edges):
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda i: server.register_edge(f"load-edge-{i}")[1], range(edges)))


def report(args, fleet, writes, write_errors, delays, elapsed):
    lat_ms = [x * 1000 for x in fleet.latencies]
    seen = [d for d in delays if d is not None]
    print(f"edges={args.edges} interval={args.interval}s duration={args.duration}s "
          f"rate={args.rate}/s server_threads={args.threads} wall={elapsed:.1f}s")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(fleet.statuses.items()))
    print(f"polls: {len(lat_ms)} ({counts}); errors: {len(fleet.errors)}"
          + (f" e.g. {fleet.errors[:3]}" if fleet.errors else ""))
    if lat_ms:
        print(f"poll latency: p50 {percentile(lat_ms, 0.5):.1f} ms, "
              f"p99 {percentile(lat_ms, 0.99):.1f} ms, max {max(lat_ms):.1f} ms")
    print(f"route writes: {len(writes)} ok, {len(write_errors)} failed")
    if seen:
        target = args.interval + 1
        p99 = percentile(seen, 0.99)
        print(f"write -> every edge has it: p50 {percentile(seen, 0.5):.2f} s, p99 {p99:.2f} s, "
              f"max {max(seen):.2f} s over {len(seen)} writes; never seen by all: "
              f"{len(delays) - len(seen)} (target p99 <= {target:.0f} s: "
              f"{'met' if p99 <= target and len(seen) == len(delays) else 'NOT met'})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=8, help="kokoa serve --threads")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="most simultaneous poll connections (waitress accepts 100)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kokoa-load-") as workdir:
        server = KokoaServer(workdir, {"KOKOA_LOG_LEVEL": "WARNING"})
        server.extra_args = ["--threads", str(args.threads)]
        server.start()
        try:
            tokens = register_fleet(server, args.edges)
            origin = server.request("POST", "/api/v1/origins", {"name": "load",
                                                                "wg_ip": "10.8.0.2"})[2]
            writes, write_errors = [], []
            started = time.monotonic()
            writer = threading.Thread(target=write_routes, args=(
                server, origin["id"], args.rate, args.duration, writes, write_errors))
            writer.start()
            fleet = asyncio.run(run_fleet(server.port, tokens, args, started))
            writer.join()
            delays = propagation(writes, fleet.timelines)
            report(args, fleet, writes, write_errors, delays, time.monotonic() - started)
        finally:
            server.stop()
    return 0


async def run_fleet(port, tokens, args, started):
    fleet = Fleet(port, tokens, args.interval, args.concurrency)
    await fleet.run(started + args.duration + args.interval + 1)
    return fleet


if __name__ == "__main__":
    sys.exit(main())
