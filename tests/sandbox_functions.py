"""The attack functions of tests/test_sandbox.py, in Python and in Go.

Each takes an event {"action": ..., ...}, tries what the action says and prints a
JSON report; the tests then check, from outside, that nothing happened.
"""

ATTACK_PY = r'''
import json, os, signal, socket, subprocess, sys, time

event = json.load(sys.stdin)
action = event["action"]


def attempt(call):
    try:
        return {"ok": True, "value": call()}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def read(path):
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", "replace")


def write(path):
    with open(path, "w") as handle:
        handle.write("written by the function\n")
    return path


def connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return "connected"


def processes():
    seen = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                seen.append([int(name), read(f"/proc/{name}/cmdline").replace("\0", " ")])
            except OSError:
                pass
    return seen


def capabilities():
    for line in read("/proc/self/status").splitlines():
        if line.startswith("CapEff:"):
            return line.split()[1]
    return ""


if action == "whoami":
    report = {"uid": os.getuid(), "gid": os.getgid(), "env": dict(os.environ),
              "caps": capabilities(), "cwd": os.getcwd(), "hostname": socket.gethostname()}
elif action == "read":
    report = {path: attempt(lambda path=path: read(path)) for path in event["paths"]}
elif action == "listdir":
    report = attempt(lambda: sorted(os.listdir(event["path"])))
elif action == "write":
    report = {path: attempt(lambda path=path: write(path)) for path in event["paths"]}
elif action == "processes":
    report = processes()
elif action == "kill":
    report = {str(pid): attempt(lambda pid=pid: os.kill(pid, signal.SIGKILL))
              for pid in event["pids"]}
elif action == "connect":
    report = attempt(lambda: connect(event["port"]))
elif action == "tmp":
    before = sorted(os.listdir("/tmp"))
    write("/tmp/" + event["mark"])
    report = {"before": before, "home": os.environ.get("HOME")}
elif action == "devices":
    def use(path, mode):
        with open(path, mode) as handle:
            return len(handle.read(16)) if "r" in mode else handle.write("x")
    report = {path: attempt(lambda path=path, mode=mode: use(path, mode))
              for path, mode in (("/dev/null", "w"), ("/dev/zero", "rb"),
                                 ("/dev/urandom", "rb"), ("/dev/random", "rb"),
                                 ("/dev/stderr", "w"))}
    import multiprocessing  # POSIX semaphores live in /dev/shm
    report["semaphore"] = attempt(lambda: multiprocessing.Lock().acquire())
elif action == "grandchild":
    subprocess.Popen(["/bin/sh", "-c", "sleep 300; : " + event["mark"]],
                     start_new_session=True, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    time.sleep(300)
    report = "not reached"
elif action == "allocate":
    report = len(bytearray(event["bytes"]))
elif action == "flood":
    while True:
        sys.stdout.write("x" * 65536)
elif action == "segfault":
    os.kill(os.getpid(), signal.SIGSEGV)
    report = "not reached"
else:
    report = "unknown action"
print(json.dumps(report))
'''

ATTACK_GO = r'''
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type result struct {
	Ok    bool   `json:"ok"`
	Value any    `json:"value,omitempty"`
	Error string `json:"error,omitempty"`
}

func attempt(value any, err error) result {
	if err != nil {
		return result{Ok: false, Error: err.Error()}
	}
	return result{Ok: true, Value: value}
}

func read(path string) (any, error) {
	data, err := os.ReadFile(path)
	return string(data), err
}

func write(path string) (any, error) {
	return path, os.WriteFile(path, []byte("written by the function\n"), 0o644)
}

func capabilities() string {
	data, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "CapEff:") {
			return strings.TrimSpace(strings.TrimPrefix(line, "CapEff:"))
		}
	}
	return ""
}

func main() {
	raw, _ := io.ReadAll(os.Stdin)
	var event struct {
		Action string   `json:"action"`
		Paths  []string `json:"paths"`
		Path   string   `json:"path"`
		Pids   []int    `json:"pids"`
		Port   int      `json:"port"`
		Mark   string   `json:"mark"`
		Bytes  int      `json:"bytes"`
	}
	if err := json.Unmarshal(raw, &event); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var report any
	switch event.Action {
	case "whoami":
		env := map[string]string{}
		for _, entry := range os.Environ() {
			key, value, _ := strings.Cut(entry, "=")
			env[key] = value
		}
		cwd, _ := os.Getwd()
		host, _ := os.Hostname()
		report = map[string]any{"uid": os.Getuid(), "gid": os.Getgid(), "env": env,
			"caps": capabilities(), "cwd": cwd, "hostname": host}
	case "read":
		out := map[string]result{}
		for _, path := range event.Paths {
			out[path] = attempt(read(path))
		}
		report = out
	case "listdir":
		entries, err := os.ReadDir(event.Path)
		names := []string{}
		for _, entry := range entries {
			names = append(names, entry.Name())
		}
		sort.Strings(names)
		report = attempt(names, err)
	case "write":
		out := map[string]result{}
		for _, path := range event.Paths {
			out[path] = attempt(write(path))
		}
		report = out
	case "processes":
		seen := [][]any{}
		entries, _ := os.ReadDir("/proc")
		for _, entry := range entries {
			pid, err := strconv.Atoi(entry.Name())
			if err != nil {
				continue
			}
			cmdline, err := os.ReadFile("/proc/" + entry.Name() + "/cmdline")
			if err == nil {
				seen = append(seen, []any{pid, strings.ReplaceAll(string(cmdline), "\x00", " ")})
			}
		}
		report = seen
	case "kill":
		out := map[string]result{}
		for _, pid := range event.Pids {
			out[strconv.Itoa(pid)] = attempt(nil, syscall.Kill(pid, syscall.SIGKILL))
		}
		report = out
	case "connect":
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", event.Port), 2*time.Second)
		if err == nil {
			conn.Close()
		}
		report = attempt("connected", err)
	case "tmp":
		entries, _ := os.ReadDir("/tmp")
		before := []string{}
		for _, entry := range entries {
			before = append(before, entry.Name())
		}
		sort.Strings(before)
		write("/tmp/" + event.Mark)
		report = map[string]any{"before": before, "home": os.Getenv("HOME")}
	case "grandchild":
		cmd := exec.Command("/bin/sh", "-c", "sleep 300; : "+event.Mark)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		time.Sleep(300 * time.Second)
		report = "not reached"
	case "allocate":
		block := make([]byte, event.Bytes)
		for i := range block {
			block[i] = 1 // touch it: the pages are really used
		}
		report = len(block)
	default:
		report = "unknown action"
	}
	out, _ := json.Marshal(report)
	fmt.Println(string(out))
}
'''

# fork and warm modes (SPEC §8): the same walls, in a handler
ATTACK_HANDLER = r'''
import os, subprocess, time


def attempt(call):
    try:
        return {"ok": True, "value": call()}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def read(path):
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", "replace")


def handler(event, context):
    action = event["action"]
    if action == "whoami":
        status = dict(line.split(":", 1) for line in read("/proc/self/status").splitlines())
        return {"uid": os.getuid(), "home": os.environ.get("HOME"),
                "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                "caps": status["CapEff"].strip()}
    if action == "read":
        return {path: attempt(lambda path=path: read(path)) for path in event["paths"]}
    if action == "segfault":  # a real fault: it kills even a PID 1
        import ctypes
        ctypes.string_at(0)
    if action == "tmp":
        before = sorted(os.listdir("/tmp"))
        with open("/tmp/" + event["mark"], "w") as handle:
            handle.write("written by the function\n")
        return {"before": before, "home": os.environ.get("HOME")}
    if action == "grandchild":
        subprocess.Popen(["/bin/sh", "-c", "sleep 300; : " + event["mark"]],
                         start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        time.sleep(300)
    if action == "escape":  # the handler's own process leaves its parent's group and
        import ctypes       # death signal, then outlives the deadline if it can
        ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG: none
        try:
            os.setsid()
        except OSError:  # already a group leader: then it has a group of its own
            pass
        subprocess.Popen(["/bin/sh", "-c", "sleep 300; : " + event["mark"]])
        time.sleep(300)
    if action == "stop-parent":  # SIGSTOP its whole group (kill(0, ...)), then crash
        import ctypes, signal
        try:
            os.kill(0, signal.SIGSTOP)
        except OSError:
            pass
        ctypes.string_at(0)
    if action == "leave":  # try to leave something for the next invocation outside /tmp
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        segment = libc.shmget(event["key"], 4096, 0o1600)  # IPC_CREAT | 0600
        def dev():
            with open("/dev/" + event["mark"], "w") as handle:
                handle.write("left")
        def shm():
            with open("/dev/shm/" + event["mark"], "w") as handle:
                handle.write("left")
        return {"sysv": segment >= 0, "dev": attempt(dev)["ok"], "shm": attempt(shm)["ok"]}
    if action == "find":  # and look for it
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        segment = libc.shmget(event["key"], 0, 0)
        if segment >= 0 and event.get("remove"):
            libc.shmctl(segment, 0, None)  # IPC_RMID
        return {"sysv": segment >= 0, "dev": os.path.exists("/dev/" + event["mark"]),
                "shm": os.path.exists("/dev/shm/" + event["mark"])}
    if action == "hold":  # a secret in memory, and a marked child to be found by
        secret = event["secret"]
        subprocess.run(["/bin/sh", "-c", "sleep " + str(event["seconds"]) + "; : " + event["mark"]])
        return len(secret)
    if action == "peek":  # every other process's memory and environment, as far as it can
        own = int(os.readlink("/proc/self"))  # as this /proc numbers it
        found = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != own:
                found[name] = {
                    part: attempt(lambda part=part: open(f"/proc/{name}/{part}", "rb").close())
                    for part in ("mem", "environ")}
                found[name]["cmdline"] = attempt(lambda: read(f"/proc/{name}/cmdline"))
                found[name]["ppid"] = attempt(
                    lambda: int(read(f"/proc/{name}/stat").rsplit(")", 1)[1].split()[1]))
        return found
    return "unknown action"
'''
