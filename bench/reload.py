"""Dev mode reload latency: from a save on disk to the first request that sees it. Run by hand.

    .venv/bin/python bench/reload.py [--runs 5]

Starts `fnserve dev` on a temporary directory (a Python function, a Go function)
and, for each kind of change, saves a new version and polls the endpoint in a
tight loop (a fresh connection per request) until the answer is the new one:

1. python edit: rewrite pyfn.py (run from source each time, so no reload is needed
   to see it: this is the floor, one process start);
2. python add: write a new function file, which answers only once the reload has
   given the worker a new registry (debounce + SIGHUP + worker boot);
3. go edit: rewrite gofn.go with a new output; the next request rebuilds it (the
   master's reloader builds it too; the cache lock makes that one build);
4. bare go build: `go build` of an edited copy of the same file, same toolchain and
   GOCACHE, for comparison with (3), measured right after it in each run.

Between measurements it waits for the reload to finish, so they do not overlap. Reports
the median, min and max of each. Go's own compile cache is the user's (warm, as
in a real edit loop); FnServe's binary cache is a temporary directory.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from live import LiveServer  # noqa: E402

from fnserve.runtimes.go import find_go  # noqa: E402

RELOAD_LINE = re.compile(r"^\[reload\] .+ modified, reloading server\.\.\.$", re.MULTILINE)
POLL_DEADLINE = 120.0
GOALS = {"python edit": 1.0, "python add": 1.0}

GO_SOURCE = """package main

import "fmt"

func main() {{ fmt.Println("{text}") }}
"""


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def poll(port: int, path: str, expected: bytes) -> None:
    deadline = time.monotonic() + POLL_DEADLINE
    while time.monotonic() < deadline:
        try:
            status, body = get(port, path)
        except OSError:
            continue
        if status == 200 and body.strip() == expected:
            return
    raise SystemExit(f"{path} never answered {expected!r}")


def settle(server: LiveServer, reloads: int) -> None:
    """Wait until `reloads` reloads were announced and only the new worker is left."""
    deadline = time.monotonic() + POLL_DEADLINE
    while time.monotonic() < deadline:
        if len(RELOAD_LINE.findall(server.stdout())) >= reloads and len(server.workers()) == 1:
            time.sleep(0.3)  # let the reloader see the quiet window close
            return
        time.sleep(0.02)
    raise SystemExit(f"no reload {reloads} within {POLL_DEADLINE}s:\n{server.stdout()}")


def measure(save: Callable[[int], bytes], port: int, path: Callable[[int], str],
            run: int) -> float:
    started = time.monotonic()
    expected = save(run)
    poll(port, path(run), expected)
    return time.monotonic() - started


def bare_go_build(go: str, directory: Path, run: int) -> float:
    source = directory / "gofn.go"
    source.write_text(GO_SOURCE.format(text=f"bare build {run}"))
    env = {key: value for key, value in os.environ.items()
           if key in ("PATH", "HOME", "TMPDIR", "LANG") or key.startswith(("GO", "CGO_"))}
    env.setdefault("GOTOOLCHAIN", "local")
    env.setdefault("CGO_ENABLED", "0")
    started = time.monotonic()
    subprocess.run([go, "build", "-o", str(directory / "fn"), "gofn.go"], cwd=directory,
                   env=env, check=True, capture_output=True)
    return time.monotonic() - started


def summary(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (f"{name:<16} median {statistics.median(ms):8.1f} ms   min {min(ms):8.1f}   "
            f"max {max(ms):8.1f}   (n={len(ms)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()

    go = find_go(os.environ.get("PATH"))
    if go is None:
        raise SystemExit("no Go toolchain: pip install 'fnserve[go]'")
    work = Path(tempfile.mkdtemp(prefix="fnserve-bench-reload-"))
    functions = work / "functions"
    functions.mkdir()
    (functions / "pyfn.py").write_text('print("py 0")\n')
    (functions / "gofn.go").write_text(GO_SOURCE.format(text="go 0"))
    (functions / "fnserve.toml").write_text('[defaults]\ntimeout = "60s"\n')
    # go derives GOCACHE from XDG_CACHE_HOME: pin the user's, or every run compiles std
    gocache = subprocess.run([go, "env", "GOCACHE"], capture_output=True, text=True,
                             check=True).stdout.strip()
    env = dict(os.environ, XDG_CACHE_HOME=str(work / "xdg-cache"), GOCACHE=gocache)

    def save_py(run: int) -> bytes:
        (functions / "pyfn.py").write_text(f'print("py {run}")\n')
        return f"py {run}".encode()

    def add_py(run: int) -> bytes:
        (functions / f"new{run}.py").write_text(f'print("new {run}")\n')
        return f"new {run}".encode()

    def save_go(run: int) -> bytes:
        (functions / "gofn.go").write_text(GO_SOURCE.format(text=f"go {run}"))
        return f"go {run}".encode()

    results: dict[str, list[float]] = {"python edit": [], "python add": [], "go edit": [],
                                       "bare go build": []}
    bare = work / "bare"
    bare.mkdir()
    server = LiveServer(functions, "--timeout", "60s", mode="dev", env=env, ready_timeout=60)
    server.start()
    try:
        poll(server.port, "/function/gofn", b"go 0")  # the first build, not measured
        poll(server.port, "/function/pyfn", b"py 0")
        reloads = 0
        for run in range(1, options.runs + 1):
            for name, save, path in (
                ("python edit", save_py, lambda r: "/function/pyfn"),
                ("python add", add_py, lambda r: f"/function/new{r}"),
                ("go edit", save_go, lambda r: "/function/gofn"),
            ):
                results[name].append(measure(save, server.port, path, run))
                reloads += 1
                settle(server, reloads)
            # interleaved, so the bare build sees the same machine as the edit above
            results["bare go build"].append(bare_go_build(go, bare, run))
    finally:
        server.stop()
        load = os.getloadavg()

    go_version = subprocess.run([go, "version"], capture_output=True, text=True).stdout.split()[2]
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, {platform.platform()}, "
          f"{go_version}, load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for name, seconds in results.items():
        print(summary(name, seconds))
    go_goal = statistics.median(results["bare go build"]) + 1.0
    verdicts = [f"{name} <= {goal:g} s: {statistics.median(results[name]) <= goal}"
                for name, goal in GOALS.items()]
    verdicts.append(f"go edit <= bare go build + 1 s ({go_goal:.2f} s): "
                    f"{statistics.median(results['go edit']) <= go_goal}")
    print("goals: " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
