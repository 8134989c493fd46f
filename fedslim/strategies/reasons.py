"""One readable line from an untrusted reason (a client's error, a Ray traceback)."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)): ?(.*)$")
REASON_LIMIT = 300


def short_reason(text: str, limit: int = REASON_LIMIT) -> str:
    """One readable line of at most ``limit`` characters from an untrusted reason.

    A client's error reason is whatever it (or Ray) sent: a whole traceback with terminal
    colour codes, or megabytes meant to flood the log. Keep the innermost exception line
    of a traceback (not the ClientAppException wrappers), else the first line.
    """
    text = _ANSI.sub("", text[:20 * limit])
    lines = ["".join(ch for ch in " ".join(ln.split()) if ch.isprintable())  # <= 6k chars
             for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return "(no reason given)"
    causes = [ln for ln in lines[1:] if (m := _EXC_LINE.match(ln))
              and "ClientAppException" not in m.group(1)]
    picked = causes[0] if causes else lines[0]
    return picked if len(picked) <= limit else picked[:limit - 1] + "…"

