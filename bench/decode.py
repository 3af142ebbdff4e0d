"""Request decoding and validation on the accept path: today's `orjson` + `Fields`
(`common/notifications.parse`, with `read_json`'s depth check) against `msgspec` decoding the
same body straight into a typed `Struct` with the same limits.

`python -m bench.decode [--rounds 20000]` prints, per body, the CPU µs per request of each
(best of five rounds, `time.process_time`). msgspec is a bench-only dependency
(requirements-dev.txt): the services do not use it (BENCHMARKS.md says why). Both decoders must
agree on which bodies are valid before any figure is printed, so the comparison is of equals.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
import orjson

from common.sending.parsing import parse
from common.web.http import MAX_JSON_DEPTH, ApiError, _deeper_than

Code = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=9)]
Language = Annotated[str, msgspec.Meta(min_length=2, max_length=35)]


class Notification(msgspec.Struct, forbid_unknown_fields=True):
    notification_type: Annotated[str, msgspec.Meta(max_length=10)]
    user_id: uuid.UUID
    template_code: Code
    request_id: RequestId
    variables: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    priority: Priority = 0
    language: Language | None = None
    send_at: str | None = None
    send_at_local: str | None = None


DECODER = msgspec.json.Decoder(Notification)

VALID = orjson.dumps(
    {
        "notification_type": "email",
        "user_id": str(uuid.uuid4()),
        "template_code": "welcome",
        "variables": {"name": "Ada", "link": "https://example.com/start"},
        "request_id": "order-1234-shipped",
        "priority": 5,
    }
)
INVALID = orjson.dumps(
    {
        "notification_type": "email",
        "user_id": "not-a-uuid",
        "template_code": "welcome",
        "request_id": "r",
        "priority": 12,
    }
)


def today(raw: bytes) -> bool:
    body = orjson.loads(raw)
    if not isinstance(body, dict) or any(
        isinstance(v, dict | list) and _deeper_than(v, MAX_JSON_DEPTH) for v in body.values()
    ):
        return False
    try:
        parse(body)
    except ApiError:
        return False
    return True


def with_msgspec(raw: bytes) -> bool:
    try:
        n = DECODER.decode(raw)
    except msgspec.ValidationError:
        return False
    # What msgspec has no constraint for, checked as the service would (and as `parse` does).
    return n.notification_type in ("email", "push")


def per_call_us(fn: Callable[[bytes], bool], raw: bytes, rounds: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(rounds):
            fn(raw)
        best = min(best, time.process_time() - start)
    return best * 1e6 / rounds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode")
    parser.add_argument("--rounds", type=int, default=20000)
    rounds = parser.parse_args().rounds
    for raw, expected in ((VALID, True), (INVALID, False)):
        assert today(raw) is expected and with_msgspec(raw) is expected, "the decoders disagree"
    print("| body | orjson + Fields, µs | msgspec Struct, µs | ratio |")
    print("|---|---|---|---|")
    for name, raw in (("valid", VALID), ("invalid (two fields)", INVALID)):
        a, b = per_call_us(today, raw, rounds), per_call_us(with_msgspec, raw, rounds)
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.1f} x |")
    try:
        DECODER.decode(INVALID)
    except msgspec.ValidationError as exc:
        print(f"\nmsgspec's error for the invalid body: {exc}")
    try:
        parse(orjson.loads(INVALID))
    except ApiError as exc:
        print(f"Fields' error for it: {exc.data}")


if __name__ == "__main__":
    main()
