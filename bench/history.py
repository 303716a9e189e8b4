"""What recording the invocation history costs: throughput with --history on vs. off,
in the same run, on the fastest path (a warm-mode handler returning {}, or with
--function exec a shell script that does nothing). Run by hand.

    .venv/bin/python bench/history.py [--duration 5] [--rounds 4] [--concurrency 8]

Two `fnserve serve` on one temporary functions directory, one writing its history to
a temporary file, one with --history off. Rounds alternate on/off (and which goes
first), so both see the same machine; every round's requests are pooled. The load
generator is wrk when installed, else a Python keep-alive client (bench/serve.py's).
Like bench/serve.py, each phase waits for a quiet machine and is redone (keeping the
least disturbed) while other processes used more than --max-foreign of the CPUs; the
server CPU per request (master + worker, the history writer thread included) is the
figure least moved by a busy machine. Afterwards the script checks that the history
holds every request sent to the recording server and reports
fnserve_history_dropped_total. Goal: on >= 95 % of off.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from live import LiveServer
from serve import (  # bench/serve.py: bench/ is on sys.path when this file is run
    WRK_SCRIPT,
    Load,
    OwnCPU,
    _become_subreaper,
    _kill_and_reap_everything,
    _on_sigterm,
    _stop_server,
    measured,
    python_load,
    wrk_load,
)

GOAL = 0.95


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=4, help="on/off rounds, pooled")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent requests")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--function", choices=("exec", "warm"), default="warm",
                        help="exec: a shell script that does nothing; warm: a Python "
                             "handler in warm mode (pool 4), the fastest path (default)")
    parser.add_argument("--max-foreign", type=float, default=0.10,
                        help="redo a phase when other processes used more of the CPUs")
    parser.add_argument("--retries", type=int, default=2, help="redos of a disturbed phase")
    parser.add_argument("--quiet-timeout", type=float, default=20.0,
                        help="longest wait for an idle machine before a phase")
    args = parser.parse_args(argv)
    use_wrk = args.client == "wrk" or (args.client == "auto" and bool(shutil.which("wrk")))

    signal.signal(signal.SIGTERM, _on_sigterm)
    _become_subreaper()
    workdir = Path(tempfile.mkdtemp(prefix="fnserve-bench-history-"))
    fn_dir = workdir / "functions"
    fn_dir.mkdir()
    noop = fn_dir / "noop"
    noop.write_text("#!/bin/sh\nexit 0\n")
    noop.chmod(0o755)
    (fn_dir / "warm.py").write_text("def handler(event, context):\n    return {}\n")
    (fn_dir / "fnserve.toml").write_text('[functions.warm]\nmode = "warm"\n')
    path = "/function/noop" if args.function == "exec" else "/function/warm"
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    history = workdir / "history.sqlite3"
    common = ("--concurrency", "100", "--log-format", "json")
    servers = {
        "history on": LiveServer(fn_dir, *common, "--history", str(history),
                                 "--history-max", "1000000"),
        "history off": LiveServer(fn_dir, *common, "--history", "off"),
    }

    own = OwnCPU()

    def once(name: str, server: LiveServer) -> Load:
        before = own.server_only()
        if use_wrk:
            result = wrk_load(name, server.port, path, args.concurrency, args.duration,
                              script)
        else:
            result = python_load(name, server.port, path, args.concurrency, args.duration)
        result.server_cpu = own.server_only() - before  # master + worker, writer included
        return result

    def load(name: str, server: LiveServer) -> Load:
        own.watch_server(server)
        return measured(lambda: once(name, server), own, args.max_foreign, args.retries,
                        args.quiet_timeout)

    results: dict[str, list[Load]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.start()
        for name, server in servers.items():  # warm up: first requests, file creation
            load(name, server)
        for round_number in range(args.rounds):
            order = list(servers.items())
            if round_number % 2:
                order.reverse()
            for name, server in order:
                result = load(name, server)
                results[name].append(result)
                print(f"  round {round_number + 1}: {result.line()}", flush=True)
        recorded_server = servers["history on"]
        metrics = recorded_server.get("/metrics").text
        dropped = re.search(r"^fnserve_history_dropped_total (\S+)$", metrics, re.M)
        sent = int(recorded_server.stats()["total_requests"])
    finally:
        for server in servers.values():
            _stop_server(server)
        _kill_and_reap_everything()

    time.sleep(0.1)
    with sqlite3.connect(history) as connection:
        stored = connection.execute("SELECT COUNT(*) FROM invocations").fetchone()[0]
    pooled = {name: Load.pool(name, loads) for name, loads in results.items()}
    on, off = pooled["history on"], pooled["history off"]
    print()
    for result in (off, on):
        print(result.line())
    ratio = on.rps / off.rps if off.rps else 0.0
    print(f"\nhistory on / off throughput: {ratio:.3f} (goal >= {GOAL}); "
          f"p50 {on.p50 * 1e3:.2f} ms vs {off.p50 * 1e3:.2f} ms")
    print(f"records stored: {stored} of {sent} invocations of the recording server; "
          f"fnserve_history_dropped_total = {dropped.group(1) if dropped else '?'}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ratio >= GOAL and stored == sent else 1


if __name__ == "__main__":
    sys.exit(main())
