"""Executor overhead: invocations through fnserve's Executor against a bare subprocess.run.

Run by hand, not a test:

    .venv/bin/python bench/executor.py -n 200

The floor is measured in the same run, on the same machine, with the same
interpreter starting the same file: `subprocess.run(argv, input=event,
capture_output=True)`. The difference is what the Executor costs per invocation
(context, environment, session, poll loop, pidfd, group kill, reap). Both sides
get the same small environment, so interpreter start-up is the same on both.
Executor and floor calls are interleaved so that drift (CPU frequency, other
load) falls on both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fnserve.config import build_environment, cache_dir
from fnserve.context import base_environment, function_environment, make_context
from fnserve.executor import Executor, Invocation
from fnserve.registry import FunctionSpec, Registry, load_registry
from fnserve.runtimes import Runtime, make_runtimes

EVENT = b'{"name": "Ada"}'
TIMEOUT = 30.0
ROUNDS = 5
FUNCTIONS = {
    "noop.py": "import sys\nsys.stdin.read()\nprint('{}')\n",
    "nop.sh": "#!/bin/sh\nexit 0\n",
}

Call = Callable[[], None]


def make_functions(directory: Path) -> None:
    for name, source in FUNCTIONS.items():
        (directory / name).write_text(source)
    (directory / "nop.sh").chmod(0o755)
    true = shutil.which("true", path="/usr/bin:/bin")
    if true:
        shutil.copy(true, directory / "true")
    (directory / "limited").mkdir()
    (directory / "limited" / "main.py").write_text(FUNCTIONS["noop.py"])
    (directory / "fnserve.toml").write_text('[functions.limited]\nmemory = "256MB"\n')


def invocation(spec: FunctionSpec, base_env: dict[str, str]) -> Invocation:
    """Built the way fnserve.invoke.run_function builds one."""
    context = make_context(spec.name, TIMEOUT, configured_env=spec.settings.env)
    return Invocation(spec, context, EVENT, time.monotonic() + TIMEOUT, base_env)


def executor_call(executor: Executor, spec: FunctionSpec, base_env: dict[str, str],
                  pooled: bool) -> Call:
    def call() -> None:
        inv = invocation(spec, base_env)
        result = executor.submit(inv).result() if pooled else executor.run(inv)
        if not result.ok:
            raise SystemExit(f"{spec.name}: {result.outcome} {result.stderr_tail!r}")
    return call


def floor_call(argv: list[str], cwd: Path, spec: FunctionSpec, base_env: dict[str, str]) -> Call:
    # the function gets an FN_CONTEXT of the same size as the executor would give it
    env = function_environment(make_context(spec.name, TIMEOUT), base_env)

    def call() -> None:
        done = subprocess.run(argv, input=EVENT, capture_output=True, cwd=cwd, env=env)
        if done.returncode != 0:
            raise SystemExit(f"floor {argv}: exit {done.returncode} {done.stderr!r}")
    return call


def timed(call: Call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def cpu_time() -> float:
    """CPU seconds of this process (all threads): the server's own cost, not the child's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sequential(pair: dict[str, Call], n: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """(wall times per call, CPU seconds per call) of each side, calls interleaved."""
    times: dict[str, list[float]] = {side: [] for side in pair}
    cpu = dict.fromkeys(pair, 0.0)
    for _ in range(n):
        for side, call in pair.items():
            before = cpu_time()
            times[side].append(timed(call))
            cpu[side] += cpu_time() - before
    return times, {side: total / n for side, total in cpu.items()}


def concurrent(call: Call, n: int, threads: int) -> tuple[list[float], float]:
    """n calls from `threads` client threads: (latencies, wall time)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counts = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]

    def client(count: int) -> None:
        mine = [timed(call) for _ in range(count)]
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=client, args=(count,)) for count in counts]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return latencies, time.perf_counter() - started


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f}"


def report(title: str, floor: list[float], ours: list[float]) -> None:
    f_med, o_med = statistics.median(floor), statistics.median(ours)
    print(f"{title:<34} {ms(f_med)} {ms(p90(floor))}   {ms(o_med)} {ms(p90(ours))}"
          f"   {ms(o_med - f_med)}  {o_med / f_med:5.2f}x")


def header(what: str) -> None:
    print(f"\n{what:<34} {'floor ms':>15}   {'executor ms':>15}   {'overhead':>7}  {'ratio':>6}")
    print(f"{'':<34} {'median':>7} {'p90':>7}   {'median':>7} {'p90':>7}   {'ms':>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="invocations per case (default 200)")
    parser.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per case")
    args = parser.parse_args()

    print(f"python {platform.python_version()} ({sys.executable}), {os.cpu_count()} cpus, "
          f"{platform.platform()}, n={args.n}, threads={args.threads}")
    with tempfile.TemporaryDirectory(prefix="fnserve-bench-") as tmp:
        directory = Path(tmp)
        make_functions(directory)
        registry = load_registry(directory)
        environ = dict(os.environ, XDG_CACHE_HOME=str(directory / "cache"))
        runtimes = make_runtimes(cache_dir(environ), build_environment(environ))
        base_env = base_environment(os.environ)
        executor = Executor(args.threads, runtimes)
        try:
            run_cases(args, registry, runtimes, executor, base_env)
        finally:
            executor.shutdown()


def run_cases(args: argparse.Namespace, registry: Registry, runtimes: dict[str, Runtime],
              executor: Executor, base_env: dict[str, str]) -> None:
    cases = {"python (noop.py)": registry.get("noop"),
             "exec (#!/bin/sh script)": registry.get("nop")}
    if "true" in registry.functions:
        cases["exec (copy of /bin/true)"] = registry.get("true")
    # the floor has no limit: this row is the price of the prlimit exec
    cases["python, memory limit (prlimit)"] = registry.get("limited")

    header("sequential, Executor.run")
    for title, spec in cases.items():
        argv = list(runtimes[spec.runtime].command(spec).argv)
        pair = {"floor": floor_call(argv, spec.cwd, spec, base_env),
                "executor": executor_call(executor, spec, base_env, pooled=False)}
        sequential(pair, args.warmup)
        times, cpu = sequential(pair, args.n)
        report(title, times["floor"], times["executor"])
        print(f"{'':<34} parent CPU per call: floor {ms(cpu['floor']).strip()} ms, "
              f"executor {ms(cpu['executor']).strip()} ms")

    header(f"concurrent, {args.threads} clients, submit")
    for title, spec in list(cases.items())[:3]:
        argv = list(runtimes[spec.runtime].command(spec).argv)
        pair = {"floor": floor_call(argv, spec.cwd, spec, base_env),
                "executor": executor_call(executor, spec, base_env, pooled=True)}
        for call in pair.values():
            concurrent(call, args.warmup, args.threads)
        latencies: dict[str, list[float]] = {side: [] for side in pair}
        walls = dict.fromkeys(pair, 0.0)
        # alternating rounds: a burst of other load on the machine hits both sides
        for _ in range(ROUNDS):
            for side, call in pair.items():
                lat, wall = concurrent(call, args.n // ROUNDS, args.threads)
                latencies[side] += lat
                walls[side] += wall
        report(title, latencies["floor"], latencies["executor"])
        done = ROUNDS * (args.n // ROUNDS)
        print(f"{'':<34} throughput: floor {done / walls['floor']:6.0f}/s, "
              f"executor {done / walls['executor']:6.0f}/s")

if __name__ == "__main__":
    main()
