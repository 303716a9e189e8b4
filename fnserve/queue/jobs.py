"""What both queues share: a job's public description, and the callback of an Outcome."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..callbacks import Callback

if TYPE_CHECKING:
    from ..outcome import Outcome

QUEUED, RUNNING, FINISHED, FAILED = "queued", "running", "finished", "failed"


def timestamp(unix: float | None = None) -> str:
    """RFC 3339, UTC, like the context's timestamp."""
    moment = time.time() if unix is None else unix
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ended_fields(outcome: Outcome) -> dict[str, Any]:
    """status, http_status, result and error of a job whose run ended with `outcome`.

    `finished` when the function succeeded (result = its output as text); `failed`
    otherwise, with `error` = the error JSON a synchronous call would have answered.
    """
    if outcome.ok:
        return {"status": FINISHED, "http_status": outcome.status,
                "result": outcome.body.decode("utf-8", "replace"), "error": None}
    try:
        error: Any = json.loads(outcome.body)
    except ValueError:
        error = {"error": outcome.body.decode("utf-8", "replace"), "code": outcome.outcome}
    return {"status": FAILED, "http_status": outcome.status, "result": None, "error": error}


def describe(request_id: str, function: str, status: str, *, enqueued_at: str | None,
             started_at: str | None = None, ended_at: str | None = None,
             http_status: int | None = None, result: str | None = None,
             error: Any = None) -> dict[str, Any]:
    return {"request_id": request_id, "function": function, "status": status,
            "http_status": http_status, "result": result, "error": error,
            "enqueued_at": enqueued_at, "started_at": started_at, "ended_at": ended_at}


def callback_for(url: str, request_id: str, function: str, status: int, body: bytes,
                 content_type: str, duration: float) -> Callback:
    """The POST to X-Callback-Url: the body a synchronous call would have had (SPEC §11)."""
    return Callback(url, body, {
        "Content-Type": content_type,
        "X-Request-Id": request_id,
        "X-Function-Name": function,
        "X-Function-Status": str(status),
        "X-Duration-Seconds": f"{duration:.6f}",
        "User-Agent": "fnserve-callback",
    }, request_id)
