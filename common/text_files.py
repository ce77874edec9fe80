"""Side files people hand the commands (catalogues, item maps, user files), read for
`file:line` errors."""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError


def numbered_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of each non-blank line: UTF-8 if the file is, else latin-1
    (MovieLens' encoding, which decodes any bytes)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
