"""The functions directory (SPEC §1): which entries are functions, names, clashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fnserve.errors import NotFound
from fnserve.invoke import resolve
from fnserve.registry import load_registry, spec_for_path

from .helpers import write_function, write_toml

HELLO = "print('hi')\n"


@pytest.fixture
def populated(fn_dir: Path) -> Path:
    """One of every kind of entry, and every kind of non-function."""
    write_function(fn_dir, "hello.py", HELLO)
    write_function(fn_dir, "pkg/main.py", HELLO)
    write_function(fn_dir, "gofile.go", "package main\nfunc main() {}\n")
    write_function(fn_dir, "gomod/main.go", "package main\nfunc main() {}\n")
    write_function(fn_dir, "gomod/go.mod", "module gomod\n\ngo 1.21\n")
    write_function(fn_dir, "script.sh", "#!/bin/sh\necho hi\n", executable=True)
    write_function(fn_dir, "binary", "#!/bin/sh\necho hi\n", executable=True)
    write_function(fn_dir, "with-dash_and_underscore.py", HELLO)
    # not functions
    write_function(fn_dir, "_helper.py", HELLO)
    write_function(fn_dir, ".hidden.py", HELLO)
    write_function(fn_dir, ".hidden-exec", "#!/bin/sh\n", executable=True)
    write_function(fn_dir, "__pycache__/cached.py", HELLO)
    write_function(fn_dir, "README.md", "# docs\n")
    write_function(fn_dir, "notes", "not executable\n")
    write_function(fn_dir, "plain.sh", "#!/bin/sh\necho not executable\n")
    write_function(fn_dir, "gofile_test.go", "package main\n")
    write_function(fn_dir, "empty/README.md", "no main here\n")
    write_function(fn_dir, "bad name.py", HELLO)
    write_function(fn_dir, "_private/main.py", HELLO)
    write_toml(fn_dir, "[defaults]\ntimeout = '5s'\n")
    return fn_dir


def test_what_is_a_function(populated: Path) -> None:
    registry = load_registry(populated)
    kinds = {spec.name: spec.runtime for spec in registry}
    assert kinds == {
        "hello": "python", "pkg": "python", "gofile": "go", "gomod": "go",
        "script": "exec", "binary": "exec", "with-dash_and_underscore": "python",
    }
    assert registry.warnings == ()


def test_entry_and_cwd(populated: Path) -> None:
    registry = load_registry(populated)
    root = populated.resolve()
    hello = registry.get("hello")
    assert (hello.entry, hello.cwd, hello.package_dir) == (root / "hello.py", root, None)
    pkg = registry.get("pkg")
    assert (pkg.entry, pkg.cwd, pkg.package_dir) == (root / "pkg/main.py", root / "pkg",
                                                     root / "pkg")
    gomod = registry.get("gomod")
    assert (gomod.entry, gomod.package_dir) == (root / "gomod/main.go", root / "gomod")
    assert registry.get("script").entry == root / "script.sh"
    assert registry.get("binary").entry == root / "binary"
    assert hello.settings.timeout == 5.0


@pytest.mark.parametrize("name", [
    "..", ".", "/", "a/b", "../hello", "hello/", "hello/../hello", "_helper", ".hidden",
    "__pycache__", "fnserve", "fnserve.toml", "README", "README.md", "notes", "plain",
    "hello.py", "x" * 65, "hello\0", "\0", "", " hello", "hello ", "bad name",
    "h\u0435llo",  # Cyrillic e
    "\uff48\uff45\uff4c\uff4c\uff4f",  # full-width hello
    "hello\n", "%2e%2e", "HELLO",
])
def test_names_that_are_not_found(populated: Path, name: str) -> None:
    registry = load_registry(populated)
    with pytest.raises(NotFound):
        registry.get(name)


@pytest.mark.parametrize("name", ["a" * 64, "A1", "1a", "a-b_c"])
def test_valid_names(fn_dir: Path, name: str) -> None:
    write_function(fn_dir, f"{name}.py", HELLO)
    assert load_registry(fn_dir).get(name).name == name


def test_a_65_char_file_is_not_a_function(fn_dir: Path) -> None:
    write_function(fn_dir, "a" * 65 + ".py", HELLO)
    assert len(load_registry(fn_dir)) == 0


def test_directory_wins_over_a_file(fn_dir: Path) -> None:
    write_function(fn_dir, "hello.py", HELLO)
    write_function(fn_dir, "hello/main.py", HELLO)
    write_function(fn_dir, "hello.sh", "#!/bin/sh\n", executable=True)
    registry = load_registry(fn_dir)
    assert registry.get("hello").entry == fn_dir.resolve() / "hello/main.py"
    [warning] = registry.warnings
    assert "'hello'" in warning
    assert "hello/main.py" in warning
    assert "hello.py" in warning and "hello.sh" in warning


def test_a_python_file_wins_over_go_and_exec(fn_dir: Path) -> None:
    write_function(fn_dir, "twice.py", HELLO)
    write_function(fn_dir, "twice.go", "package main\nfunc main() {}\n")
    registry = load_registry(fn_dir)
    assert registry.get("twice").runtime == "python"
    assert len(registry.warnings) == 1


def test_main_py_wins_over_main_go_in_a_directory(fn_dir: Path) -> None:
    write_function(fn_dir, "both/main.py", HELLO)
    write_function(fn_dir, "both/main.go", "package main\nfunc main() {}\n")
    assert load_registry(fn_dir).get("both").runtime == "python"


def test_settings_for_a_missing_function_warn(fn_dir: Path) -> None:
    write_function(fn_dir, "hello.py", HELLO)
    write_toml(fn_dir, "[functions.ghost]\ntimeout = '1s'\n")
    registry = load_registry(fn_dir)
    assert any("functions.ghost: no such function" in w for w in registry.warnings)


def test_settings_merge_defaults_under_the_function(fn_dir: Path) -> None:
    write_function(fn_dir, "a.py", HELLO)
    write_function(fn_dir, "b.py", HELLO)
    write_toml(fn_dir, """
        [defaults]
        timeout = "10s"
        memory = "128MB"
        env = { A = "1", B = "default" }
        [functions.a]
        timeout = "500ms"
        env = { B = "own" }
    """)
    registry = load_registry(fn_dir)
    a, b = registry.get("a").settings, registry.get("b").settings
    assert (a.timeout, a.memory, dict(a.env)) == (0.5, 128 * 1024**2, {"A": "1", "B": "own"})
    assert (b.timeout, b.memory, dict(b.env)) == (10.0, 128 * 1024**2, {"A": "1", "B": "default"})
    assert registry.get("a").deadline(30.0) == 0.5
    assert registry.get("b").deadline(5.0) == 5.0  # never longer than the server's


def test_symlinked_entries(fn_dir: Path, tmp_path: Path) -> None:
    outside = write_function(tmp_path, "outside.py", HELLO)
    (fn_dir / "linked.py").symlink_to(outside)
    (fn_dir / "dangling.py").symlink_to(tmp_path / "nowhere.py")
    registry = load_registry(fn_dir)
    assert registry.get("linked").runtime == "python"
    with pytest.raises(NotFound):
        registry.get("dangling")


def test_resolve_by_name_or_path(populated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve("hello", populated).entry == populated.resolve() / "hello.py"
    by_path = resolve(str(populated / "pkg"), ".")
    assert (by_path.name, by_path.runtime) == ("pkg", "python")
    assert resolve(str(populated / "script.sh")).runtime == "exec"
    monkeypatch.chdir(populated)
    assert resolve("hello.py").settings.timeout == 5.0  # settings of the file's directory


def test_spec_for_path_refuses_non_functions(populated: Path) -> None:
    with pytest.raises(NotFound):
        spec_for_path(populated / "notes")
    with pytest.raises(NotFound):
        spec_for_path(populated / "empty")
    with pytest.raises(NotFound):
        spec_for_path(populated / "missing.py")

