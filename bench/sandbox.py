"""The sandbox's cost per invocation in process mode: the same functions through the same
Executor, `isolation = "none"` against `isolation = "sandbox"` (bubblewrap), same run.

Run by hand, not a test:

    .venv/bin/python bench/sandbox.py -n 200

Calls alternate between the two sides, so drift (CPU frequency, other load) falls on
both alike; the overhead is the difference of the medians. Also timed: building the
bwrap argv alone (the Python side of the cost, in the server's thread); `/bin/true`
bare, under bubblewrap's floor (the sandbox's namespaces with /usr, /proc, /dev and
/tmp only), that floor without the network namespace and with the `env -u PWD` hop,
and in the whole sandbox, interleaved: what each part costs on this machine; and
where a sandboxed start spends its time: before the command's first output (set-up)
or after it (tear-down).

With `--baseline FILE` (another version of fnserve/sandbox.py, e.g. from
`git show main:fnserve/sandbox.py > /tmp/sandbox_main.py`) it also alternates, through
the same Executor.run, calls whose argv that version builds with calls whose argv this
tree builds: the effect of a change to the argv, from one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import fnserve.executor
import fnserve.sandbox
from fnserve.context import base_environment, make_context
from fnserve.executor import Executor, Invocation
from fnserve.registry import FunctionSpec, Registry, load_registry
from fnserve.runtimes import make_runtimes
from fnserve.sandbox import DEV_ARGS, _system_mounts, find_bwrap, sandbox_argv

EVENT = b'{"name": "Ada"}'
TIMEOUT = 30.0
FUNCTIONS = {
    "noop.py": "import sys\nsys.stdin.read()\nprint('{}')\n",
    "nop.sh": "#!/bin/sh\nexit 0\n",
}
HANDLER = "def handler(event, context):\n    return {}\n"
# fork and warm (SPEC §8): one function per mode and isolation, each its own process
MODE_TOML = "".join(
    f'[functions.{mode}{box}]\nmode = "{mode}"\npool = 1\n'
    + ('isolation = "sandbox"\n' if box else "")
    for mode in ("fork", "warm") for box in ("", "box"))


def make_functions(directory: Path) -> None:
    for name, source in FUNCTIONS.items():
        (directory / name).write_text(source)
    (directory / "nop.sh").chmod(0o755)
    (directory / "_helpers.py").write_text("")
    for mode in ("fork", "warm"):
        for box in ("", "box"):
            (directory / f"{mode}{box}.py").write_text(HANDLER)
    (directory / "fnserve.toml").write_text(MODE_TOML)


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def set_up_and_tear_down(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(spawn to the command's first byte of output, that byte to the exit seen), in ms."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE)
    started = time.perf_counter()
    assert proc.stdout is not None
    proc.stdout.read(1)
    output = time.perf_counter()
    proc.wait()
    proc.stdout.close()
    return (output - started) * 1000, (time.perf_counter() - output) * 1000


def executor_call(executor: Executor, spec: FunctionSpec, base_env: dict[str, str]
                  ) -> Callable[[], None]:
    def call() -> None:
        context = make_context(spec.name, TIMEOUT, configured_env=spec.settings.env)
        result = executor.run(Invocation(spec, context, EVENT, time.monotonic() + TIMEOUT,
                                         base_env))
        if not result.ok:
            raise SystemExit(f"{spec.name} ({spec.settings.isolation}): {result.outcome} "
                             f"{result.stderr_tail!r}")
    return call


def load_baseline(path: Path) -> ModuleType:
    """Another sandbox.py as a module of its own (its relative imports made absolute)."""
    source = path.read_text().replace("from .", "from fnserve.")
    spec = importlib.util.spec_from_loader("baseline_sandbox", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, str(path), "exec"), module.__dict__)  # a bench, run by hand
    return module


def compare_with(baseline: ModuleType, executor: Executor, registry: Registry, n: int,
                 base_env: dict[str, str]) -> None:
    """none, the baseline's argv and this tree's argv, shuffled in each round, through
    Executor.run (its argv builder is pointed at one or the other before each call)."""
    using = {"module": fnserve.sandbox}
    setattr(fnserve.executor, "sandbox_argv",  # noqa: B010 - not an attribute it exports
            lambda *args, **kwargs: using["module"].sandbox_argv(*args, **kwargs))
    calls: dict[str, tuple[ModuleType | None, Callable[[], None]]] = {}
    for name, label in (("nop", "exec"), ("noop", "python")):
        spec = registry.get(name)
        boxed = dataclasses.replace(spec, settings=dataclasses.replace(
            spec.settings, isolation="sandbox"))
        calls[f"{label}, none"] = (None, executor_call(executor, spec, base_env))
        calls[f"{label}, baseline"] = (baseline, executor_call(executor, boxed, base_env))
        calls[f"{label}, this tree"] = (fnserve.sandbox, executor_call(executor, boxed, base_env))

    def call(label: str) -> float:
        module, run = calls[label]
        if module is not None:
            using["module"] = module
        return timed(run)

    for label in calls:  # warm up
        for _ in range(3):
            call(label)
    times: dict[str, list[float]] = {label: [] for label in calls}
    order = list(calls)
    for _ in range(n):
        random.shuffle(order)
        for label in order:
            times[label].append(call(label))
    print(f"\n--baseline, shuffled, Executor.run   median ms   overhead ms  (load average "
          f"{os.getloadavg()[0]:.1f})")
    for label, values in times.items():
        none = statistics.median(times[label.split(",")[0] + ", none"])
        median = statistics.median(values)
        print(f"{label:<36}{median:>10.2f}{median - none:>14.2f}")


def alternate(plain: Callable[[], None], boxed: Callable[[], None], n: int
              ) -> tuple[list[float], list[float]]:
    """Both warmed up, then `n` timed calls of each, alternating: drift falls on both."""
    for _ in range(5):
        plain()
        boxed()
    none, sandbox = [], []
    for _ in range(n):
        none.append(timed(plain))
        sandbox.append(timed(boxed))
    return none, sandbox


def row(label: str, none: list[float], sandbox: list[float]) -> str:
    def p90(values: list[float]) -> float:
        return statistics.quantiles(values, n=10)[-1]
    mn, ms = statistics.median(none), statistics.median(sandbox)
    return (f"{label:<28}{mn:>8.2f}{p90(none):>8.2f}{ms:>10.2f}{p90(sandbox):>8.2f}"
            f"{ms - mn:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="calls per side and function")
    parser.add_argument("--baseline", type=Path,
                        help="another fnserve/sandbox.py to compare this tree's argv with")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    bwrap = find_bwrap(os.environ.get("PATH"))
    if bwrap is None:
        raise SystemExit("bench/sandbox.py needs bwrap (the bubblewrap package)")
    base_env = base_environment(os.environ)
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout
    print(f"python {platform.python_version()} ({sys.executable}), {os.cpu_count()} cpus, "
          f"{platform.platform()}, {version.strip()}, n={args.n}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        make_functions(directory)
        registry = load_registry(directory)
        executor = Executor(1, make_runtimes(directory / "cache", {}), bwrap=bwrap)
        print("\nsequential, Executor.run       none ms          sandbox ms    overhead")
        print(f"{'':<28}{'median':>8}{'p90':>8}{'median':>10}{'p90':>8}{'ms':>10}")
        for name, label, network in (("noop", "python (noop.py)", False),
                                     ("nop", "exec (#!/bin/sh script)", False),
                                     ("nop", "exec, network = true", True)):
            spec = registry.get(name)
            boxed = dataclasses.replace(spec, settings=dataclasses.replace(
                spec.settings, isolation="sandbox", network=network))
            print(row(label, *alternate(executor_call(executor, spec, base_env),
                                        executor_call(executor, boxed, base_env), args.n)))
        for mode in ("fork", "warm"):  # the sandbox is set up once, by the first call
            print(row(f"python {mode} (handler)", *alternate(
                executor_call(executor, registry.get(mode), base_env),
                executor_call(executor, registry.get(f"{mode}box"), base_env), args.n)))
        spec = registry.get("noop")
        boxed = dataclasses.replace(spec, settings=dataclasses.replace(
            spec.settings, isolation="sandbox"))
        argv = (sys.executable, str(spec.entry))
        builds = [timed(lambda: sandbox_argv(bwrap, boxed, argv, spec.cwd))
                  for _ in range(args.n)]
        print(f"\nbuilding the bwrap argv: median {statistics.median(builds) * 1000:.0f} us")
        true = shutil.which("true", path="/usr/bin:/bin") or "/bin/true"
        env = shutil.which("env", path="/usr/bin:/bin") or "/usr/bin/env"
        # bubblewrap's own floor: the sandbox's namespaces and flags, /usr, /proc, /dev and
        # /tmp, nothing of /etc or the functions directory; then what the rest adds
        floor = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", "--unshare-cgroup-try", "--uid", "65534", "--gid", "65534",
                 "--cap-drop", "ALL", "--die-with-parent", "--new-session", *_system_mounts(),
                 "--proc", "/proc", *DEV_ARGS, "--tmpfs", "/tmp", "--"]
        steps = {
            "/bin/true": [true],
            "bwrap floor ... /bin/true": [*floor, true],
            "  the same without --unshare-net": [a for a in floor if a != "--unshare-net"] + [true],
            "  the same + env -u PWD": [*floor, env, "-u", "PWD", true],
            "the whole sandbox, /bin/true": sandbox_argv(bwrap, boxed, (true,), spec.cwd),
        }
        floor_times: dict[str, list[float]] = {label: [] for label in steps}
        for _ in range(args.n):  # interleaved, as above
            for label, command in steps.items():
                started = time.perf_counter()
                subprocess.run(command, cwd=spec.cwd, check=True)
                floor_times[label].append((time.perf_counter() - started) * 1000)
        print("\nsubprocess.run, interleaved          median ms")
        for label, values in floor_times.items():
            print(f"{label:<36}{statistics.median(values):>10.2f}")
        echo = ("/bin/sh", "-c", "echo x")
        for label, command in (("without bwrap", list(echo)),
                               ("sandboxed", sandbox_argv(bwrap, boxed, echo, spec.cwd))):
            phases = [set_up_and_tear_down(command, spec.cwd) for _ in range(args.n)]
            print(f"sh -c 'echo x' {label}: spawn to first byte median "
                  f"{statistics.median(p[0] for p in phases):.2f} ms, first byte to exit "
                  f"median {statistics.median(p[1] for p in phases):.2f} ms")
        if baseline is not None:
            compare_with(baseline, executor, registry, args.n, base_env)
        executor.shutdown()


if __name__ == "__main__":
    main()
