"""What the event loop (uvloop, as deployed) can raise that is the infrastructure's, not ours.

When a connection's socket breaks while the loop watches it (PostgreSQL restarted, a Redis or
service connection cut or timed out), uvloop can close that descriptor's poll handle and yet keep
it under the descriptor number for a while. A new socket handed the same number meanwhile (a new
PostgreSQL connection, aiohttp's connect to another service) cannot register with the loop:
`RuntimeError: unable to perform operation on <UVPoll closed=True>; the handler is closed`. It is
a connection that could not be made, like a refused one: retried, held or answered 503 with
`Retry-After`, never a failed notification or a 500. A moment later the number is free again.
"""

from __future__ import annotations

STALE_HANDLE = "the handler is closed"


def stale_handle(exc: BaseException) -> bool:
    """uvloop refused a new socket whose descriptor's old poll handle is closed but not gone."""
    return isinstance(exc, RuntimeError) and STALE_HANDLE in str(exc)
