"""Logs: JSON lines for shipping (serve), readable lines for people (dev).

The same dictConfig goes to gunicorn (logconfig_dict), so gunicorn's own error
and access lines come out in the same format as FnServe's.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

INVOCATION_LOGGER = "fnserve.invocation"
FUNCTION_LOGGER = "fnserve.function"

invocation_log = logging.getLogger(INVOCATION_LOGGER)
function_log = logging.getLogger(FUNCTION_LOGGER)

_RESET = "\033[0m"
_COLOURS = {2: "\033[32m", 3: "\033[36m", 4: "\033[33m", 5: "\033[31m"}
_DIM = "\033[2m"
_TEXT_EXTRAS = ("request_id", "function", "status", "outcome", "duration_ms", "trace_id")


class JsonFormatter(_JsonFormatter):
    """One JSON object per line: timestamp, level, logger, message, then the extras."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
        )


class TextFormatter(logging.Formatter):
    """For people: `12:00:01 POST hello 200 12.3ms`, coloured on a terminal."""

    def __init__(self, *args: Any, color: bool | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.color = sys.stdout.isatty() if color is None else color

    def _paint(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.color else text

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = record.__dict__
        if record.name == INVOCATION_LOGGER:
            status = fields.get("status", 0)
            line = (f"{fields.get('method', '')} {fields.get('function', '')} "
                    f"{self._paint(_COLOURS.get(status // 100, ''), str(status))} "
                    f"{fields.get('duration_ms', 0):.1f}ms")
            if fields.get("outcome") not in ("ok", None):
                line += f" ({fields['outcome']})"
            return f"{clock} {line}"
        if record.name == FUNCTION_LOGGER:
            return self._paint(_DIM, f"{clock}   {fields.get('function', '')} | "
                                     f"{record.getMessage()}")
        text = f"{clock} {record.levelname.lower()} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def logging_config(log_format: str, dev: bool = False) -> dict[str, Any]:
    """A dictConfig for FnServe and gunicorn alike (gunicorn's logconfig_dict)."""
    formatter: dict[str, Any] = {"()": f"{__name__}.JsonFormatter"} if log_format == "json" \
        else {"()": f"{__name__}.TextFormatter"}
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "fnserve",
        # serve mode prints nothing on stdout; dev talks to the person at the terminal
        "stream": "ext://sys.stdout" if dev else "ext://sys.stderr",
    }
    quiet = {"level": "WARNING", "handlers": ["fnserve"], "propagate": False}
    loud = {"level": "INFO", "handlers": ["fnserve"], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"fnserve": formatter},
        "handlers": {"fnserve": handler},
        "root": {"level": "WARNING", "handlers": ["fnserve"]},
        "loggers": {
            "gunicorn.error": loud,
            # the invocation line is the access log of /function; gunicorn's own
            # access line would double every request (turn it on in conf if wanted)
            "gunicorn.access": quiet,
            "fnserve": loud,
        },
    }
