"""Log output: the usual text lines, or one JSON object per line for log shippers.

`INTEREST_LOG_FORMAT=json` switches every long-running command (worker, serve, monitor) to
JSON lines with the fields shippers index on: time (ISO-8601, UTC), level, logger, message, and
the exception's traceback when there is one. Messages never carry event payloads or user data
beyond what the code logs by name.
"""

from __future__ import annotations

import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

import orjson

from streams.settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def logging_config(settings: Settings) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the settings' level and format."""
    formatter = (
        {"()": f"{__name__}.JsonFormatter"}
        if settings.log_format == "json"
        else {"format": "[%(asctime)s] %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stdout",
            }
        },
        "root": {"level": settings.log_level, "handlers": ["default"]},
    }


def configure_logging(settings: Settings) -> None:
    """Apply `logging_config` to this process."""
    logging.config.dictConfig(logging_config(settings))
