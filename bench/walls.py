"""What a sandboxed fork-mode invocation's own walls cost (SPEC §12): the same handler
in fork mode with `isolation = "none"` and with `isolation = "sandbox"`, through the
same Executor, same run.

Run by hand, not a test:

    .venv/bin/python bench/walls.py -n 300 --threads 8

In a sandbox every forked invocation gets a user, mount and PID namespace of its own
and a fresh /tmp (runtimes/_bootstrap.py, WalledChild): two forks where the plain
fork server does one. The fork server makes the next invocation's child ahead, so
a lone caller should not wait for it; a busy server pays for it in CPU. So this
prints both: sequential latency (one call at a time, alternating sides) and
throughput with `--threads` callers (rounds alternating sides, pooled).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fnserve.context import base_environment, make_context
from fnserve.executor import Executor, Invocation
from fnserve.registry import FunctionSpec, load_registry
from fnserve.runtimes import make_runtimes
from fnserve.sandbox import find_bwrap

EVENT = b'{"name": "Ada"}'
TIMEOUT = 30.0
HANDLER = "def handler(event, context):\n    return {}\n"
TOML = ('[functions.plain]\nmode = "fork"\n'
        '[functions.walled]\nmode = "fork"\nisolation = "sandbox"\n')
ROUNDS = 6


def call(executor: Executor, spec: FunctionSpec, base_env: dict[str, str]) -> float:
    context = make_context(spec.name, TIMEOUT, configured_env=spec.settings.env)
    started = time.perf_counter()
    result = executor.run(Invocation(spec, context, EVENT, time.monotonic() + TIMEOUT, base_env))
    if not result.ok:
        raise SystemExit(f"{spec.name}: {result.outcome} {result.stderr_tail!r}")
    return (time.perf_counter() - started) * 1000


def throughput(executor: Executor, spec: FunctionSpec, base_env: dict[str, str],
               calls: int, threads: int) -> tuple[int, float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: call(executor, spec, base_env), range(calls)))
    return calls, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="sequential calls per side")
    parser.add_argument("--threads", type=int, default=8, help="callers for the throughput")
    args = parser.parse_args()
    bwrap = find_bwrap(os.environ.get("PATH"))
    if bwrap is None:
        raise SystemExit("bench/walls.py needs bwrap (the bubblewrap package)")
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout
    print(f"python {platform.python_version()} ({sys.executable}), {os.cpu_count()} cpus, "
          f"{platform.platform()}, {version.strip()}, load average {os.getloadavg()[0]:.1f}")
    base_env = base_environment(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for name in ("plain", "walled"):
            (directory / f"{name}.py").write_text(HANDLER)
        (directory / "fnserve.toml").write_text(TOML)
        registry = load_registry(directory)
        plain, walled = registry.get("plain"), registry.get("walled")
        executor = Executor(args.threads, make_runtimes(directory / "cache", {}), bwrap=bwrap)
        try:
            for _ in range(10):  # starts both fork servers
                call(executor, plain, base_env)
                call(executor, walled, base_env)
            none, boxed = [], []
            for _ in range(args.n):
                none.append(call(executor, plain, base_env))
                boxed.append(call(executor, walled, base_env))
            print(f"\nsequential, median ms: none {statistics.median(none):.2f}, "
                  f"sandbox {statistics.median(boxed):.2f}, overhead "
                  f"{statistics.median(boxed) - statistics.median(none):+.2f} ms  (n={args.n})")
            totals = {"none": [0, 0.0], "sandbox": [0, 0.0]}
            for round_ in range(ROUNDS):
                sides = [("none", plain), ("sandbox", walled)]
                for side, spec in sides if round_ % 2 == 0 else sides[::-1]:
                    done, seconds = throughput(executor, spec, base_env, args.n, args.threads)
                    totals[side][0] += done
                    totals[side][1] += seconds
            rate = {side: done / seconds for side, (done, seconds) in totals.items()}
            print(f"{args.threads} threads, {ROUNDS} alternating rounds of {args.n} calls: "
                  f"none {rate['none']:.0f}/s, sandbox {rate['sandbox']:.0f}/s "
                  f"(sandbox/none {rate['sandbox'] / rate['none']:.2f})")
        finally:
            executor.shutdown()


if __name__ == "__main__":
    main()
