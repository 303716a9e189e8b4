"""Python modes benchmark (SPEC §8): process vs fork vs warm, and functions-framework. By hand.

    .venv/bin/python bench/modes.py [--rounds 3] [--duration 5] [--concurrency 8]
                                    [--ff-python PATH]

One run, on a temporary functions directory, wrk at concurrency 8 (POST `{}`), in
rounds (each phase in turn, then again; the figures pool the rounds):
1. `hello` (a seed-style handler) in process, fork and warm mode behind one
   `fnserve serve` (default settings);
2. `heavy` (the same handler importing json, email.mime.text, http.client,
   urllib.request, decimal, asyncio, logging, uuid, xml.etree.ElementTree) in
   process and fork mode;
3. Google's functions-framework serving the same hello in-process (its own
   gunicorn), from a separate virtualenv: --ff-python names its interpreter, else
   one is made once in bench/.venv-ff (`pip install functions-framework`); it is
   never a dependency of FnServe;
4. the warm per-invocation overhead, without HTTP: sequential `Executor.run` of a
   warm `hello` (pool = 1) against a bare framed round trip on the same process's
   channel (the same request frame, sent and answered directly), interleaved in
   blocks; overhead = the difference of the medians.
Goals (issue 9): fork >= 6x process on hello and >= 25x on heavy; warm >= 1.0x
functions-framework req/s with p99 <= 1.5x its p99; warm overhead <= 0.3 ms.

Every process this script starts is stopped on exit (Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
from live import LiveServer, free_port  # noqa: E402
from serve import (  # noqa: E402
    WRK_SCRIPT,
    Load,
    _become_subreaper,
    _kill_and_reap_everything,
    _on_sigterm,
    wrk_load,
)

HANDLER = '''
def handler(event, context):
    return {"message": "Hello, " + (event.get("name") or "world") + "!"}


if __name__ == "__main__":
    import json, os, sys
    print(json.dumps(handler(json.load(sys.stdin), json.loads(os.environ["FN_CONTEXT"]))))
'''
HEAVY_IMPORTS = ("import json, email.mime.text, http.client, urllib.request, decimal, "
                 "asyncio, logging, uuid, xml.etree.ElementTree\n")
TOML = """
[functions.fhello]
mode = "fork"

[functions.whello]
mode = "warm"

[functions.fheavy]
mode = "fork"
"""
FF_SOURCE = '''
import functions_framework


@functions_framework.http
def hello(request):
    event = request.get_json(silent=True) or {}
    return {"message": "Hello, " + (event.get("name") or "world") + "!"}
'''


def functions_framework_python(given: str | None) -> str:
    if given:
        return given
    venv = REPO / "bench" / ".venv-ff"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} (functions-framework, for this benchmark only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "functions-framework"],
                       check=True)
    return str(python)


def serve_functions_framework(python: str, source: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([python, "-m", "functions_framework", "--target", "hello",
                             "--source", str(source), "--host", "127.0.0.1", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("functions-framework did not start")


def load(name: str, port: int, path: str, args: argparse.Namespace, script: Path,
         warmup: bool) -> Load:
    if warmup:
        wrk_load(name + " (warm-up)", port, path, args.concurrency, args.warmup, script)
    result = wrk_load(name, port, path, args.concurrency, args.duration, script)
    print("  " + result.line(), flush=True)
    return result


def warm_overhead(fn_dir: Path, blocks: int, per_block: int) -> dict[str, float]:
    """Executor.run of a warm function vs a bare round trip on the same process's channel."""
    sys.path.insert(0, str(REPO))
    from fnserve.context import base_environment, make_context
    from fnserve.executor import Executor, Invocation, Job, LineLog, Run
    from fnserve.registry import FunctionSpec, Settings
    from fnserve.runtimes import make_runtimes
    from fnserve.runtimes.channel import RESPONSE, request_frame

    spec = FunctionSpec("whello", "python", fn_dir / "whello.py", fn_dir,
                        Settings(mode="warm", pool=1))
    runtimes = make_runtimes(Path(tempfile.mkdtemp()), {})
    executor = Executor(1, runtimes)
    base = base_environment(os.environ)

    def invocation() -> Invocation:
        return Invocation(spec, make_context("whello", 10.0), b"{}", time.monotonic() + 10.0, base)

    assert executor.run(invocation()).ok
    pool: Any = runtimes["python"].runner(spec)
    process = pool._idle[0]
    channel = process.channel
    inv = invocation()
    job = Job(inv, inv.context, inv.deadline_at, Run(inv), LineLog(inv, None, None),
              LineLog(inv, None, None), list)
    frame = request_frame(job)

    def bare() -> None:
        channel.setblocking(True)
        channel.sendall(frame)
        header = b""
        while len(header) < RESPONSE.size:
            header += channel.recv(RESPONSE.size - len(header))
        _, length, _ = RESPONSE.unpack(header)
        while length:
            length -= len(channel.recv(length))
        channel.setblocking(False)

    executor_ms: list[float] = []
    bare_ms: list[float] = []
    try:
        for _ in range(blocks):
            for _ in range(per_block):
                started = time.perf_counter()
                result = executor.run(invocation())
                executor_ms.append((time.perf_counter() - started) * 1e3)
                assert result.ok, result
            for _ in range(per_block):
                started = time.perf_counter()
                bare()
                bare_ms.append((time.perf_counter() - started) * 1e3)
    finally:
        executor.shutdown()
    executor_median = statistics.median(executor_ms)
    bare_median = statistics.median(bare_ms)
    print(f"  warm Executor.run median {executor_median:.3f} ms, bare round trip median "
          f"{bare_median:.3f} ms: overhead {executor_median - bare_median:.3f} ms "
          f"(n={len(executor_ms)} each)", flush=True)
    return {"executor_ms": executor_median, "bare_ms": bare_median,
            "overhead_ms": executor_median - bare_median}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per phase per round (5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, pooled (3)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    parser.add_argument("--concurrency", type=int, default=8, help="wrk connections (8)")
    parser.add_argument("--ff-python", help="interpreter of a venv with functions-framework")
    parser.add_argument("--overhead-blocks", type=int, default=10)
    parser.add_argument("--overhead-per-block", type=int, default=200)
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk)")
    ff_python = functions_framework_python(args.ff_python)

    signal.signal(signal.SIGTERM, _on_sigterm)
    _become_subreaper()
    workdir = Path(tempfile.mkdtemp(prefix="fnserve-modes-"))
    fn_dir = workdir / "functions"
    fn_dir.mkdir()
    for name in ("hello", "fhello", "whello"):
        (fn_dir / f"{name}.py").write_text(HANDLER)
    for name in ("heavy", "fheavy"):
        (fn_dir / f"{name}.py").write_text(HEAVY_IMPORTS + HANDLER)
    (fn_dir / "fnserve.toml").write_text(TOML)
    ff_source = workdir / "ffmain.py"
    ff_source.write_text(FF_SOURCE)
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)

    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, "
          f"{platform.platform()}, c={args.concurrency}, {args.rounds} rounds of "
          f"{args.duration:g}s per phase, load average {os.getloadavg()}", flush=True)
    rounds: dict[str, list[Load]] = {}
    server = LiveServer(fn_dir)
    ff: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        # not in serve.CHILDREN: wrk_load stops those after each wrk run
        ff, ff_port = serve_functions_framework(ff_python, ff_source)
        phases = [(f"fnserve {name}", server.port, f"/function/{name}")
                  for name in ("hello", "fhello", "whello", "heavy", "fheavy")]
        phases.append(("functions-framework hello", ff_port, "/"))
        # the phases of a round follow each other and rounds repeat, so each phase sees
        # the same (shared, busy) machine over the run; the figures pool every round
        for index in range(args.rounds):
            print(f"round {index + 1}/{args.rounds}", flush=True)
            for name, port, path in phases:
                rounds.setdefault(name, []).append(
                    load(name, port, path, args, script, warmup=index == 0))
        server.stop()
        overhead = warm_overhead(fn_dir, args.overhead_blocks, args.overhead_per_block)
    finally:
        if ff is not None:
            os.killpg(ff.pid, signal.SIGTERM)
            ff.wait(timeout=30)
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
        _kill_and_reap_everything()
    print(f"== {args.rounds} rounds pooled ==")
    results = {}
    for name, loads in rounds.items():
        pooled = Load.pool(name, loads)
        print(pooled.line())
        print(f"{'':25}per round: req/s {pooled.extra['rounds_rps']}")
        results[name.split()[-1] if name.startswith("fnserve") else "ff"] = pooled

    fork_hello = results["fhello"].rps / results["hello"].rps
    fork_heavy = results["fheavy"].rps / results["heavy"].rps
    warm_ff = results["whello"].rps / results["ff"].rps
    warm_p99 = results["whello"].p99 / results["ff"].p99
    goals = [
        (f"fork/process hello {fork_hello:.1f}x (goal >= 6x)", fork_hello >= 6),
        (f"fork/process heavy {fork_heavy:.1f}x (goal >= 25x)", fork_heavy >= 25),
        (f"warm/functions-framework req/s {warm_ff:.2f}x (goal >= 1.0x)", warm_ff >= 1.0),
        (f"warm/functions-framework p99 {warm_p99:.2f}x (goal <= 1.5x)", warm_p99 <= 1.5),
        (f"warm overhead {overhead['overhead_ms']:.3f} ms (goal <= 0.3 ms)",
         overhead["overhead_ms"] <= 0.3),
    ]
    for text, met in goals:
        print(f"{text}: {'MET' if met else 'missed'}")
    print(f"load average at the end {os.getloadavg()}")
    return 0 if all(met for _, met in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
