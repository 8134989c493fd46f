"""Client error reasons are untrusted text: the server keeps one short readable line."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fedslim.strategies.reasons import REASON_LIMIT, short_reason

RAY_TRACEBACK = (
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1263, ip=192.0.2.2)\n"
    '  File "/x/client_app.py", line 161, in __call__\n'
    "    return self._registered_funcs[full_name](message, context)\n"
    "KeyError: 'fedslim.payload'\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: 'fedslim.payload'\n"
)


def test_ray_traceback_becomes_its_innermost_exception() -> None:
    assert short_reason(RAY_TRACEBACK) == "KeyError: 'fedslim.payload'"


def test_plain_reason_is_kept() -> None:
    assert short_reason("disk full") == "disk full"
    assert short_reason("") == "(no reason given)"
    assert short_reason("\n  \n") == "(no reason given)"


def test_flood_is_cut_to_the_limit() -> None:
    out = short_reason("x" * 10_000_000)
    assert len(out) == REASON_LIMIT and out.endswith("…")


@given(st.text(max_size=3000))
def test_any_text_gives_one_bounded_printable_line(text: str) -> None:
    out = short_reason(text)
    assert 0 < len(out) <= REASON_LIMIT
    assert out.isprintable()  # one line: no newline, no escape or control character
