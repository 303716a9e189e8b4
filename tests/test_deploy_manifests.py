"""conf/k8s/*.yaml and conf/Dockerfile cannot run here: check that they say true things.

Parsed, not pattern-matched: probes point at routes the app (or the worker's metrics
server) really has, on ports the containers really open; the args parse with the real
CLI; the drain fits in terminationGracePeriodSeconds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from fnserve.app import create_app
from fnserve.cli import main
from fnserve.config import load_config, parse_duration
from tests.live import REPO

K8S = REPO / "conf" / "k8s"
DOCKERFILE = REPO / "conf" / "Dockerfile"


def documents() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents() if doc["kind"] == kind]


def deployment(command: str) -> dict[str, Any]:
    [found] = [d for d in of_kind("Deployment")
               if d["spec"]["template"]["spec"]["containers"][0]["args"][0] == command]
    return found


def container(deploy: dict[str, Any]) -> dict[str, Any]:
    [only] = deploy["spec"]["template"]["spec"]["containers"]
    return only


def flag(args: list[str], name: str) -> str:
    [value] = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]
    return value


def port_named(spec: dict[str, Any], name: str) -> int:
    [port] = [p["containerPort"] for p in spec["ports"] if p["name"] == name]
    return int(port)


def app_routes(tmp_path: Path) -> set[str]:
    config = load_config(tmp_path, {}, {"PATH": "/usr/bin:/bin"})
    app = create_app(config)
    return {rule.rule for rule in app.url_map.iter_rules() if "GET" in (rule.methods or ())}


def test_every_manifest_parses_and_has_the_basics() -> None:
    docs = documents()
    assert {doc["kind"] for doc in docs} == {"Deployment", "Service"}
    for doc in docs:
        assert doc["apiVersion"] in ("apps/v1", "v1")
        assert doc["metadata"]["name"]
    for deploy in of_kind("Deployment"):
        template_labels = deploy["spec"]["template"]["metadata"]["labels"]
        assert deploy["spec"]["selector"]["matchLabels"].items() <= template_labels.items()


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_the_args_parse_with_the_real_cli(command: str) -> None:
    args = container(deployment(command))["args"]
    with main.make_context("fnserve", list(args)) as context:
        sub = main.get_command(context, command)
        assert sub is not None
        try:
            sub.make_context(command, list(args[1:]))
        except click.UsageError as exc:  # pragma: no cover - the failure message
            pytest.fail(f"{command} args do not parse: {exc}")


def test_the_serve_probe_and_service_point_at_real_routes_and_ports(tmp_path: Path) -> None:
    serve = container(deployment("serve"))
    http = port_named(serve, "http")
    assert int(flag(serve["args"], "port")) == http
    routes = app_routes(tmp_path)
    readiness = serve["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/healthz" and readiness["path"] in routes
    assert readiness["port"] in ("http", http)
    assert serve["livenessProbe"]["tcpSocket"]["port"] in ("http", http)

    [service] = of_kind("Service")
    labels = deployment("serve")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] in ("http", http)


def test_the_worker_probe_points_at_its_metrics_server() -> None:
    from fnserve.worker_http import METRICS_ROUTES

    worker = container(deployment("worker"))
    metrics = port_named(worker, "metrics")
    assert int(flag(worker["args"], "metrics-port")) == metrics
    probe = worker["livenessProbe"]["httpGet"]
    assert probe["path"] in METRICS_ROUTES
    assert probe["port"] in ("metrics", metrics)
    assert flag(worker["args"], "queue") == flag(container(deployment("serve"))["args"],
                                                 "queue")


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_the_drain_fits_in_the_grace_period(command: str) -> None:
    deploy = deployment(command)
    spec = container(deploy)
    graceful = parse_duration(flag(spec["args"], "graceful-timeout"))
    timeout = parse_duration(flag(spec["args"], "timeout"))
    assert graceful >= timeout  # a running invocation can use all of its deadline
    pre_stop = spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    grace = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > sleep + graceful, (grace, sleep, graceful)


def test_the_dockerfile_serves_on_the_port_it_exposes(tmp_path: Path) -> None:
    text = DOCKERFILE.read_text()
    exposed = re.findall(r"^EXPOSE (\d+)$", text, re.M)
    assert exposed == [re.search(r"FNSERVE_PORT=(\d+)", text).group(1)]  # type: ignore[union-attr]
    assert re.search(r'^ENTRYPOINT \["fnserve"\]$', text, re.M)
    assert re.search(r"^USER \d+$", text, re.M), "runs as an unprivileged user"
    assert "/healthz" in text and "/healthz" in app_routes(tmp_path)
    assert int(exposed[0]) == port_named(container(deployment("serve")), "http")
