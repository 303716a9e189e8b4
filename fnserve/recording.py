"""Every invocation into the history, through the one hook: `Service.listeners`.

HTTP, Lambda, async and replay invocations all end in Service._report, which calls
the listener below with the request and its Outcome; no route records anything
itself. The listener only slices the bodies (so the queue never holds megabytes)
and hands a record-maker to the writer's thread, which redacts, cuts and writes.

What is never stored: request headers at all (so no X-API-Key, Authorization or
AWS signature header); the values of those credentials, of the server's key and of
presigned-URL query credentials (X-Amz-Signature, ...) are replaced by "[redacted]"
wherever they appear (the parameters, the event, the function's output and stderr).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .history import (
    HistoryError,
    HistoryStore,
    HistoryWriter,
    head,
    record_row,
    secrets_of,
    tail,
)
from .outcome import Outcome
from .service import InvocationRequest, Service

log = logging.getLogger("fnserve.history")

# forwarded header variables whose values are credentials (SPEC §10)
CREDENTIAL_ENV = ("HTTP_X_API_KEY", "HTTP_AUTHORIZATION", "HTTP_X_AMZ_SECURITY_TOKEN")
# query parameters of AWS presigned requests that carry a credential
CREDENTIAL_PARAMETERS = frozenset({"x-amz-signature", "x-amz-security-token", "x-amz-credential"})
# refusals under load are not worth a write each (429: nothing ran); the SPEC's
# outcomes, unavailable included, are recorded
NOT_RECORDED = frozenset({"rejected"})


@dataclass
class History:
    """The history of one app: its writer (None: --history off) and its reader."""

    writer: HistoryWriter | None
    store: HistoryStore | None
    max_records: int

    @property
    def enabled(self) -> bool:
        return self.store is not None


class HistoryCollector(Collector):
    def __init__(self, history: History) -> None:
        self.history = history

    def collect(self) -> Iterator[Any]:
        writer = self.history.writer
        yield CounterMetricFamily(
            "fnserve_history_dropped",
            "Invocation records dropped because the history writer could not keep up.",
            value=writer.dropped if writer is not None else 0)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def attach_history(service: Service) -> History:
    """Open the history of `service.config` (raises HistoryError for an unusable file),
    add the recording listener and the dropped counter."""
    config = service.config
    writer = None
    if config.history is not None:
        try:
            writer = HistoryWriter(config.history, config.history_max)
        except HistoryError as exc:  # `serve` checked it at startup: it went bad since
            log.error("%s: serving without a history", exc)
    if writer is None:
        history = History(None, None, config.history_max)
    else:
        history = History(writer, HistoryStore(writer.path), config.history_max)
        service.listeners.append(functools.partial(_record, writer, config.api_key,
                                                   str(config.functions_dir)))
    service.metrics.register(HistoryCollector(history))
    return history


def _record(writer: HistoryWriter, api_key: str | None, functions_dir: str,
            request: InvocationRequest, outcome: Outcome, duration: float) -> None:
    if outcome.outcome in NOT_RECORDED:
        return
    values = [request.forwarded[name] for name in CREDENTIAL_ENV if name in request.forwarded]
    if api_key:
        values.append(api_key)
    parameters = request.parameters
    if any(name.lower() in CREDENTIAL_PARAMETERS for name in parameters):
        values += [v for k, v in parameters.items() if k.lower() in CREDENTIAL_PARAMETERS]
        parameters = {k: "[redacted]" if k.lower() in CREDENTIAL_PARAMETERS else v
                      for k, v in parameters.items()}
    secrets = secrets_of(values)
    result = outcome.result
    # positional, in record_row's order: the request thread pays for little more than this
    writer.submit(functools.partial(
        record_row, request.request_id, request.spec.name, request.source, request.method,
        (result.context.timestamp if result is not None else "") or _now(),
        duration * 1000, outcome.status, outcome.outcome,
        result.exit_code if result is not None else None,
        result.signal if result is not None else None,
        head(request.event, secrets), parameters, head(outcome.body, secrets),
        outcome.content_type, tail(result.stderr_tail, secrets) if result is not None else b"",
        request.tracing.trace_id, request.replay_of, functions_dir, secrets))
