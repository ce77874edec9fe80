"""Structured logs (streams/logs.py): one JSON object per line when INTEREST_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import logging.config

import pytest

from streams.logs import logging_config
from streams.settings import Settings


def test_json_lines_carry_level_logger_message_and_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logging.config.dictConfig(logging_config(Settings(log_format="json", log_level="INFO")))
    log = logging.getLogger("streams.test")
    log.info("model %s loaded", "v1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("batch failed")
    lines = capsys.readouterr().out.splitlines()
    first, second = (json.loads(line) for line in lines[-2:])
    assert first["level"] == "INFO" and first["logger"] == "streams.test"
    assert first["message"] == "model v1 loaded" and first["time"].endswith("+00:00")
    assert "RuntimeError: boom" in second["exception"]
    logging.config.dictConfig(logging_config(Settings()))


def test_text_is_the_default_and_a_bad_format_is_refused() -> None:
    assert logging_config(Settings())["formatters"]["default"].get("()") is None
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")
