"""The queue's settings: --queue, --queue-size, --result-ttl and a function's `retries`."""

from __future__ import annotations

from pathlib import Path

import pytest

from fnserve.config import load_config
from fnserve.errors import ConfigError
from fnserve.registry import load_registry
from tests.helpers import write_function, write_toml


def test_defaults_are_the_specs(fn_dir: Path) -> None:
    config = load_config(fn_dir, {}, {})
    assert config.queue is None
    assert config.queue_size == 1000
    assert config.result_ttl == 86400.0


def test_flags_env_and_toml_set_them(fn_dir: Path) -> None:
    write_toml(fn_dir, """
        [server]
        queue-size = 5
        result-ttl = "1h"
    """)
    config = load_config(fn_dir, {"queue": "redis://127.0.0.1:6379/2"},
                         {"FNSERVE_QUEUE_SIZE": "7"})
    assert config.queue == "redis://127.0.0.1:6379/2"
    assert config.queue_size == 7  # the environment beats the toml
    assert config.result_ttl == 3600.0


@pytest.mark.parametrize(("flags", "where"), [
    ({"queue": "amqp://host/"}, "--queue"),
    ({"queue_size": "0"}, "--queue-size"),
    ({"result_ttl": "soon"}, "--result-ttl"),
])
def test_bad_values_name_the_option(fn_dir: Path, flags: dict[str, str], where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        load_config(fn_dir, flags, {})


def test_retries_per_function_and_in_defaults(fn_dir: Path) -> None:
    write_function(fn_dir, "a.py", "print(1)\n")
    write_function(fn_dir, "b.py", "print(1)\n")
    write_toml(fn_dir, """
        [defaults]
        retries = 2

        [functions.b]
        retries = 0
    """)
    registry = load_registry(fn_dir)
    assert registry.get("a").settings.retries == 2
    assert registry.get("b").settings.retries == 0


@pytest.mark.parametrize("value", ["-1", "true", '"3"', "1.5", "101"])
def test_bad_retries_name_the_key(fn_dir: Path, value: str) -> None:
    write_function(fn_dir, "a.py", "print(1)\n")
    write_toml(fn_dir, f"""
        [functions.a]
        retries = {value}
    """)
    with pytest.raises(ConfigError, match=r"functions\.a\.retries"):
        load_registry(fn_dir)
