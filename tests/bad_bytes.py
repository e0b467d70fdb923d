"""Random bytes that are not UTF-8 text, as a user's file holds them after a broken download or a wrong encoding.

line = not_utf8(seed)                   # one line of them, no line break inside
problem = not_utf8_problem(line)        # "not UTF-8 text (byte 0x.. at column ..)", as the readers say it
"""

from __future__ import annotations

import random

SEEDS = (0, 1, 2)


def not_utf8(seed: int, length: int = 32) -> bytes:
    """``length`` random bytes at most, without line breaks, that do not decode as UTF-8 (drawn until they don't)."""
    rng = random.Random(seed)
    while True:
        line = rng.randbytes(length).replace(b"\n", b"").replace(b"\r", b"")
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return line


def not_utf8_problem(line: bytes) -> str:
    """Where ``line`` stops being UTF-8, in the readers' words."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})"
    raise ValueError("the line is UTF-8 text")
