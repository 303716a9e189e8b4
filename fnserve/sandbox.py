"""Sandboxed functions (SPEC §12): a command's argv, wrapped in bubblewrap.

`sandbox_argv()` is a plain function of (bwrap, spec, argv, cwd) -> argv, applied
where the executor builds a function's argv, so every runtime gets it: a Python
script, a built Go binary, an executable, or a fork server / pool process that
then forks the invocations (they inherit the walls). The memory limit (prlimit)
goes outside it: RLIMIT_DATA is inherited through bwrap by the function.

The executor applies it in `Executor.process_argv`, the one argv builder of
every process of a function: a process-mode run, and the fork server or warm
pool process of fork/warm modes, whose bootstrap script is named in `readable`
(channel.py). Every invocation such a process serves inherits the walls; a fork
server adds walls of its own per forked invocation (a user, mount and PID namespace
and a fresh /tmp: _bootstrap.py, WalledChild), a warm process serves invocation
after invocation with one /tmp.

What the function gets:
- its own user namespace, where it is uid/gid 65534 with no capabilities. Outside
  it acts as the server's user, but only on the few paths mounted below;
- its own PID namespace, with a fresh /proc: it sees and signals only its own
  processes. bwrap's init is PID 1 there; when the function's main process exits,
  or the executor kills bwrap (`--die-with-parent` carries the kill inward), the
  kernel kills everything left in the namespace, `setsid()` escapees included;
- its own network namespace with only a loopback (unless `network = true`), IPC
  and UTS namespaces, `--new-session` (no TIOCSTI into a terminal);
- a file system of: the system directories and a few files of /etc, read-only;
  the interpreter or binary it runs with, read-only wherever it lives (its
  prefix when it is a Python installation or venv); of the functions directory
  only its own entry and the shared `_` entries (never other functions, never
  fnserve.toml); a private tmpfs on /tmp, which is also its HOME; each path of
  `writable` read-write at the same path; a minimal /dev (below). The root is
  remounted read-only.

What it costs (docs/performance.md, bench/sandbox.py): bwrap's set-up is paid at every
process start. Besides the namespaces (the network one is the dearest, ~0.7 ms here),
it grows with the mounts: each bind is a mount, a remount and a read of the whole mount
table (/proc/self/mountinfo). Measured interleaved, the 7 binds of /etc entries cost
~1.3 ms and bwrap's `--dev` ~1.5 ms per start, so /etc is now one bind of a private copy
of its files plus one of /etc/alternatives (`_etc_mounts`) and /dev three device binds
(`DEV_ARGS`); together -1.6 ms per start. What is left is bwrap's own (exec, clone,
pivot_root, its init process), the network namespace, and the `env -u PWD` hop (~1 ms,
below).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import ConfigError
from .reaper import REAPER
from .registry import FunctionSpec

SANDBOX_ID = "65534"  # nobody/nogroup
SANDBOX_HOME = "/tmp"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# what programs need of /etc; never all of it (shadow, ssl/private, credentials). The
# files are copied into one private directory bound as /etc, the directories bound on
# top: three mounts at most, not one per entry (`_etc_mounts`)
ETC_ENTRIES = ("passwd", "group", "nsswitch.conf", "hosts", "ld.so.cache", "localtime",
               "alternatives")
ETC_NETWORK_ENTRIES = ("resolv.conf", "gai.conf", "host.conf", "services", "ssl/certs")
# A minimal /dev instead of bwrap's `--dev`, which costs ~1 ms more per start: a tmpfs,
# six device binds, a devpts instance, and for devpts a second user namespace (bwrap
# maps the server's uid to 0 to mount it, then nests one more namespace for 65534). Here:
# the three devices programs open, on the root tmpfs (read-only with it at the end, no
# mount of its own); /dev/random as a link to urandom (the same generator since Linux
# 5.6: neither blocks once the pool is initialised); /dev/fd and /dev/std{in,out,err}
# as in bwrap's `--dev`; /dev/shm a link to the private /tmp, so POSIX shared memory
# and semaphores (multiprocessing) work. Left out: /dev/full, /dev/tty (`--new-session`:
# there is no terminal), /dev/pts and /dev/ptmx (no pseudo-terminals).
DEV_NODES = ("null", "zero", "urandom")
DEV_ARGS: tuple[str, ...] = (
    *(arg for node in DEV_NODES for arg in ("--dev-bind", f"/dev/{node}", f"/dev/{node}")),
    "--symlink", "urandom", "/dev/random", "--symlink", "/proc/self/fd", "/dev/fd",
    "--symlink", "/proc/self/fd/0", "/dev/stdin", "--symlink", "/proc/self/fd/1", "/dev/stdout",
    "--symlink", "/proc/self/fd/2", "/dev/stderr", "--symlink", "/tmp", "/dev/shm")
_SYSTEM_PATH = "/usr/bin:/bin"
_MAX_SYMLINKS = 40
_SIGNAL_BASE = 128
_MAX_SIGNAL = 64
_PROBE_TIMEOUT = 30.0


def find_bwrap(path: str | None) -> str | None:
    """bwrap on the server's PATH (SPEC §12), None when missing."""
    return shutil.which("bwrap", path=path)


def sandbox_argv(bwrap: str, spec: FunctionSpec, argv: Sequence[str], cwd: Path,
                 readable: Iterable[str | Path] = ()) -> list[str]:
    """`argv`, to be run in `cwd` under bwrap with the walls of `spec.settings`.

    `readable`: more paths the command needs read-only (a fork server's bootstrap
    script); the program argv[0] and its installation are found here.
    """
    settings = spec.settings
    own = spec.package_dir or spec.entry
    functions_dir = own.parent
    args = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try"]
    if not settings.network:
        args.append("--unshare-net")
    args += ["--uid", SANDBOX_ID, "--gid", SANDBOX_ID, "--cap-drop", "ALL",
             "--die-with-parent", "--new-session"]
    args += _system_mounts()
    args += _etc_mounts(settings.network)
    args += ["--proc", "/proc", *DEV_ARGS, "--tmpfs", "/tmp"]
    mounted = [*_system_roots()]  # real paths
    later = []  # paths inside the functions directory go on top of its view
    for path in _unique([*_program_paths(argv[0]), *map(str, readable)]):
        real = os.path.realpath(path)
        if _inside(real, mounted):
            continue
        if _inside(real, [str(functions_dir)]):
            later.append(path)
            continue
        args += ["--ro-bind", path, path]
        mounted.append(real)
    # an empty, read-only view of the functions directory with only what it may read,
    # even when the directory lies under a tree mounted above
    args += ["--tmpfs", str(functions_dir)]
    entries = [str(entry) for entry in [own, *shared_entries(functions_dir)]]
    for path in _unique([*entries, *later]):  # an executable function is argv[0] too
        args += ["--ro-bind", path, path]
    args += ["--remount-ro", str(functions_dir)]
    for path in settings.writable:
        args += ["--bind", path, path]
    args += ["--remount-ro", "/", "--setenv", "HOME", SANDBOX_HOME, "--chdir", str(cwd), "--"]
    # bwrap sets PWD; the function's environment stays exactly SPEC §2's. One more exec
    # (~1 ms, a third of it env loading the locale), but bwrap has no cheaper way: it
    # applies --unsetenv and --clearenv while parsing its options, and sets PWD after
    # its chdir, just before it forks the command
    pwd = settings.env.get("PWD")  # a configured PWD is kept, as without a sandbox
    args += [_env_program(), *(("-u", "PWD") if pwd is None else (f"PWD={pwd}",)), *argv]
    return args


def exit_status(returncode: int) -> int:
    """bwrap reports a command killed by signal N as status 128+N; give it back as -N, as
    subprocess does without a sandbox. (A function that itself exits 128+N reads the
    same: the shells' convention.)"""
    if _SIGNAL_BASE < returncode <= _SIGNAL_BASE + _MAX_SIGNAL:
        return _SIGNAL_BASE - returncode
    return returncode


def check_sandboxes(specs: Iterable[FunctionSpec], bwrap: str | None) -> None:
    """At startup: a sandboxed function needs bwrap, and writable paths that exist and do
    not contain the functions directory. Raises ConfigError naming the function."""
    for spec in specs:
        problem = sandbox_problem(spec, bwrap)
        if problem is not None:
            raise ConfigError(f"function {spec.name}: {problem}")


def sandbox_problem(spec: FunctionSpec, bwrap: str | None) -> str | None:
    settings = spec.settings
    if not settings.sandboxed:
        return None
    if bwrap is None:
        return ('isolation = "sandbox" needs bubblewrap, and no `bwrap` is on PATH '
                "(install the bubblewrap package)")
    refusal = bwrap_refusal(bwrap)
    if refusal is not None:
        return f"bwrap cannot make a sandbox on this machine: {refusal}"
    functions_dir = os.path.realpath((spec.package_dir or spec.entry).parent)
    for path in settings.writable:
        if not os.path.exists(path):
            return f"writable path {path} does not exist"
        if _inside(functions_dir, [os.path.realpath(path)]):
            return (f"writable path {path} contains the functions directory, which would "
                    f"give the function the others and fnserve.toml")
    return None


@functools.cache
def bwrap_refusal(bwrap: str) -> str | None:
    """bwrap's own error when it cannot create the namespaces here (user namespaces
    disabled, or restricted as by Ubuntu's AppArmor policy), None when it can. Asked
    once per process: every invocation would otherwise fail the same way."""
    probe = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
             "--unshare-uts", "--uid", SANDBOX_ID, "--gid", SANDBOX_ID, "--ro-bind", "/", "/",
             "--proc", "/proc", "--cap-drop", "ALL", "--die-with-parent", "--new-session",
             "--", _true_program()]
    try:
        with REAPER.spawning():  # while it runs the reaper judges no unknown child (reaper.py)
            done = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=_PROBE_TIMEOUT, env={"PATH": _SYSTEM_PATH})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def shared_entries(functions_dir: Path) -> list[Path]:
    """The `_` entries every function may read (`_helpers.py`); not `__pycache__`, which
    holds the other functions' compiled code."""
    try:
        with os.scandir(functions_dir) as entries:
            return sorted(functions_dir / e.name for e in entries
                          if e.name.startswith("_") and e.name != "__pycache__")
    except OSError:
        return []


# -- the parts that depend only on the machine ----------------------------------------


@functools.cache
def _system_mounts() -> tuple[str, ...]:
    args: list[str] = []
    for directory in SYSTEM_DIRS:
        if os.path.islink(directory):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(directory), directory]
        elif os.path.isdir(directory):
            args += ["--ro-bind", directory, directory]
    return tuple(args)


# /etc as one bind of a private copy of its files; its directories (alternatives, and
# ssl/certs with network = true) are bound on top, live: they hold hundreds of links or
# files, slow to copy (~0.35 ms per symlink on this VM's ext4 /tmp) and to check. The
# copy is made by the first sandbox of a process (a few ms, once) in a new directory
# under the temporary directory, then checked at every argv (one stat per entry, ~30 us
# in all) and made again when an entry changed: its inode, size or mtime. A replaced
# copy is not deleted before the process exits: sandboxes started with it (a fork
# server, a pool process) may still have it mounted, as a bind of the old file would
# have kept the old file. When a copy cannot be made (a file the server cannot read),
# /etc is one bind per entry, as before.
_etc_lock = threading.Lock()
_etc_views: dict[bool, tuple[int, tuple[object, ...], str | None]] = {}  # network -> view
_etc_copies: list[tuple[int, str]] = []  # (pid, directory): removed at exit by that pid
_etc_copy_keys: dict[str, tuple[int, int, int, int, int] | None] = {}  # as made


def _etc_mounts(network: bool) -> list[str]:
    names = ETC_ENTRIES + (ETC_NETWORK_ENTRIES if network else ())
    signature = tuple(_stat_key(f"/etc/{name}") for name in names)
    with _etc_lock:
        pid, known, directory = _etc_views.get(network, (0, (), None))
        if pid != os.getpid() or known != signature or not _unchanged_copy(directory):
            directory = _copy_etc(names)
            _etc_views[network] = (os.getpid(), signature, directory)
            if directory is not None:
                _etc_copy_keys[directory] = _stat_key(directory)
    args = [] if directory is None else ["--ro-bind", directory, "/etc"]
    for name, key in zip(names, signature, strict=True):
        if key is not None and (directory is None or stat.S_ISDIR(key[0])):
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    return args


def _unchanged_copy(directory: str | None) -> bool:
    """Is the copy as we made it? A temporary directory may be cleaned up under a
    long-running server (systemd-tmpfiles): an entry removed changes its mtime."""
    return directory is None or _stat_key(directory) == _etc_copy_keys.get(directory)


def _stat_key(path: str) -> tuple[int, int, int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mode, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _copy_etc(names: Sequence[str]) -> str | None:
    """A new directory with a copy of each existing /etc file of `names` (its content and
    mode, a symlink followed, as a bind shows it) and an empty directory where each
    directory of `names` will be bound; None if it cannot be made."""
    directory = tempfile.mkdtemp(prefix="fnserve-etc-")
    if not _etc_copies:
        atexit.register(_remove_etc_copies)
    _etc_copies.append((os.getpid(), directory))
    try:
        os.chmod(directory, 0o755)
        for name in names:
            source, target = f"/etc/{name}", os.path.join(directory, name)
            if not os.path.exists(source):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.isdir(source):
                os.mkdir(target)
            else:
                shutil.copy2(source, target)
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return directory


def _remove_etc_copies() -> None:
    for pid, directory in _etc_copies:
        if pid == os.getpid():  # not a copy the parent of a forked worker still uses
            shutil.rmtree(directory, ignore_errors=True)


@functools.cache
def _system_roots() -> tuple[str, ...]:
    return tuple(d for d in SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d))


@functools.cache
def _true_program() -> str:
    return shutil.which("true", path=_SYSTEM_PATH) or "/bin/true"


@functools.cache
def _env_program() -> str:
    return shutil.which("env", path=_SYSTEM_PATH) or "/usr/bin/env"


@functools.lru_cache(maxsize=256)
def _program_paths(program: str) -> tuple[str, ...]:
    """What running `program` needs outside the system: each step of its symlink chain,
    or the Python installation (prefix) that step lives in, venvs' base included.

    Cached per program for the life of the process: interpreters and built binaries do
    not move (a new Go build is a new path)."""
    if not os.path.isabs(program):
        return ()  # found on PATH inside the sandbox, in the system directories
    paths: list[str] = []
    path = os.path.normpath(program)
    for _ in range(_MAX_SYMLINKS):
        paths.extend(_installation(path))
        if not os.path.islink(path):
            break
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    return tuple(paths)


def _installation(path: str) -> list[str]:
    bin_dir = os.path.dirname(path)
    prefix = os.path.dirname(bin_dir)
    if os.path.basename(bin_dir) != "bin" or not _is_python_prefix(prefix):
        return [path] if os.path.exists(path) else []
    found = [os.path.realpath(prefix)]
    home = _venv_home(prefix)  # a venv made with --copies has no symlink to follow
    if home is not None and _is_python_prefix(os.path.dirname(home)):
        found.append(os.path.realpath(os.path.dirname(home)))
    return found


def _is_python_prefix(prefix: str) -> bool:
    if os.path.isfile(os.path.join(prefix, "pyvenv.cfg")):
        return True
    try:
        return any(name.startswith("python3") for name in os.listdir(os.path.join(prefix, "lib")))
    except OSError:
        return False


def _venv_home(prefix: str) -> str | None:
    try:
        with open(os.path.join(prefix, "pyvenv.cfg"), encoding="utf-8") as handle:
            for line in handle:
                key, sep, value = line.partition("=")
                if sep and key.strip() == "home":
                    return value.strip()
    except OSError:
        return None
    return None


def _inside(real: str, roots: Iterable[str]) -> bool:
    """Is the real path `real` one of the real paths `roots`, or below one?"""
    return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)


def _unique(paths: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(paths))
