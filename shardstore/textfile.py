"""Reading a text file a user named (a config, a policy, a tokens or sentences file), with one-line errors."""

from __future__ import annotations

from pathlib import Path

from shardstore.errors import InvalidInputError


def read_user_text(path: Path, what: str = "") -> str:
    """The file's UTF-8 text; a missing, unreadable or non-UTF-8 file is an error naming it (``what`` first)."""
    where = f"{what} {path}" if what else str(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"{where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{where}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})") from None
