"""Shared fixtures. Real processes, real files in tmp_path, real Go builds: no mocks.

Caches: FnServe keeps Go binaries under $XDG_CACHE_HOME/fnserve, and the test
session points XDG_CACHE_HOME at a temporary directory so no test reads or
leaves binaries in the developer's cache. Go's own compile cache (GOCACHE) is
shared with the developer's, though: go derives it from XDG_CACHE_HOME too, and
a fresh one recompiles the standard library (~15 s) for every session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from fnserve.config import build_environment, cache_dir
from fnserve.executor import Executor, Invocation
from fnserve.runtimes import Runtime, make_runtimes


def _go_build_cache(environ: Mapping[str, str]) -> str:
    # go's own rule (os.UserCacheDir): GOCACHE, else $XDG_CACHE_HOME/go-build, else ~/.cache
    if environ.get("GOCACHE"):
        return environ["GOCACHE"]
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "go-build")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """XDG_CACHE_HOME of the whole session (CLI subprocesses, servers) in a tmp dir."""
    xdg = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GOCACHE", _go_build_cache(os.environ))
        patch.setenv("XDG_CACHE_HOME", str(xdg))
        # the invocation history's default file: never the developer's ~/.local/share
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        yield xdg


@pytest.fixture
def environ(tmp_path: Path, isolated_cache: Path) -> dict[str, str]:
    """A server environment to pass explicitly (run_function, load_config, ...).

    Its own XDG_CACHE_HOME, so each test starts with no Go binary cached.
    """
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "GOCACHE")
           if key in os.environ}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    return env


@pytest.fixture
def fn_dir(tmp_path: Path) -> Path:
    """An empty functions directory."""
    directory = tmp_path / "functions"
    directory.mkdir()
    return directory


@pytest.fixture
def runtimes(environ: dict[str, str]) -> dict[str, Runtime]:
    return make_runtimes(cache_dir(environ), build_environment(environ))


class StderrLines:
    """A stderr_sink that remembers (request_id, line) pairs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, invocation: Invocation, line: str) -> None:
        self.lines.append((invocation.context.request_id, line))

    def of(self, request_id: str) -> list[str]:
        return [line for rid, line in self.lines if rid == request_id]


@pytest.fixture
def stderr_lines() -> StderrLines:
    return StderrLines()


@pytest.fixture
def executor(runtimes: dict[str, Runtime], stderr_lines: StderrLines) -> Iterator[Executor]:
    pool = Executor(4, runtimes, stderr_sink=stderr_lines)
    yield pool
    pool.shutdown()


# -- CI must run the tests of real toolchains and services, never skip them ----------

# a test marked with one of these needs something real (the Go toolchain, bwrap, a
# redis-server, Chromium) that .ci/run installs: in CI, one skipped fails the run
REQUIRED_IN_CI = ("go", "sandbox", "redis", "browser")
_required = {marker: {"ran": 0, "skipped": 0} for marker in REQUIRED_IN_CI}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for marker, counts in _required.items():
        if marker not in report.keywords:
            continue
        if report.skipped:
            counts["skipped"] += 1
        elif report.when == "call":
            counts["ran"] += 1


def _collected(session: pytest.Session, marker: str) -> bool:
    return any(item.get_closest_marker(marker) for item in session.items)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # .ci/run sets CI: a machine without the toolchain or service must fail there
    if not os.environ.get("CI"):
        return
    for marker, counts in _required.items():
        if _collected(session, marker) and (counts["skipped"] or not counts["ran"]):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    ci = " (CI: a skipped one fails the run)" if os.environ.get("CI") else ""
    for marker, counts in _required.items():
        if counts["ran"] or counts["skipped"]:
            terminalreporter.write_line(
                f"{marker} tests: {counts['ran']} ran, {counts['skipped']} skipped{ci}")


# -- AWS clients (the Lambda tests) ---------------------------------------------------


@pytest.fixture(scope="module")
def no_aws_profile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Clients read no ~/.aws of the developer's, and never ask an instance metadata service."""
    empty = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_CONFIG_FILE", str(empty))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"):
            patch.delenv(name, raising=False)
        yield
