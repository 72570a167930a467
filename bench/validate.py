"""Benchmark of the agent's payload validator: this agent.sh against an older one, same run.

For each size it builds a schema-1 payload with kokoa.py's own generator (and a schema-2 one),
runs the jq validator that agent.sh runs on every new payload (extracted from each script's
text) a few times, and prints the median seconds and the ratio new / baseline. The baseline is
agent.sh at a git revision (default: the last commit before contract v2).

Usage: python3 bench/validate.py [--sizes 1000,10000,100000] [--runs 3] [--baseline REV]
                                [--upstreams N]
Needs jq and git. Not part of the test run.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import kokoa  # noqa: E402
from conftest import agent_jq  # noqa: E402


def validator(text):
    """(jq program, extra jq arguments) of the payload validator in an agent.sh text."""
    program = agent_jq("COMMON_JQ", text) + " " + agent_jq("VALIDATE_JQ", text)
    args = []
    if "$schemas" in program:
        args = ["--arg", "schemas", "1,2", "--arg", "wgnet", "", "--argjson", "maxhosts",
                "100000"]
    return program, args


def payload_file(directory, count, schema, upstreams):
    """A payload of `count` hostnames over `upstreams` distinct addresses (many routes share
    an origin in real fleets; one port per route is the worst case)."""
    routes = {f"host{i:06d}.bench.example.com":
              {"upstream": f"10.8.{i % upstreams % 64}.2:{8000 + i % upstreams}"}
              for i in range(count)}
    payload, _ = kokoa.edge_payload(routes, [], False, schema)
    path = Path(directory) / f"payload-{count}-{schema}-{upstreams}.json"
    path.write_text(json.dumps(payload))
    return path


def median_seconds(program, args, path, runs):
    times = []
    for _ in range(runs):
        start = time.monotonic()
        result = subprocess.run(["jq", "-r", *args, program, str(path)], capture_output=True,
                                text=True, timeout=1800)
        times.append(time.monotonic() - start)
        if not result.stdout.startswith("ok "):
            raise SystemExit(f"validator refused the payload: {result.stdout[:200]}")
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default="3c0ed1d")
    parser.add_argument("--upstreams", type=int, default=64,
                        help="distinct upstream addresses (0: one per hostname)")
    args = parser.parse_args()
    old_text = subprocess.run(["git", "show", f"{args.baseline}:agent.sh"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout
    old = validator(old_text)
    new = validator((REPO / "agent.sh").read_text())
    print(f"{'hostnames':>10} {'baseline s':>11} {'schema 1 s':>11} {'ratio':>6} "
          f"{'schema 2 s':>11} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as directory:
        for count in (int(n) for n in args.sizes.split(",")):
            upstreams = args.upstreams or count
            v1 = payload_file(directory, count, 1, upstreams)
            base = median_seconds(*old, v1, args.runs)
            one = median_seconds(*new, v1, args.runs)
            two = median_seconds(*new, payload_file(directory, count, 2, upstreams), args.runs)
            print(f"{count:>10} {base:>11.2f} {one:>11.2f} {one / base:>6.2f} "
                  f"{two:>11.2f} {two / base:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
