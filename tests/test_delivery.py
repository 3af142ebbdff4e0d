"""The retry decision, a pure function: which retry queue, which attempt next, or failed."""

from __future__ import annotations

import pytest

from common.delivery.interface import DeliveryError, Fail, Retry, decide

DELAYS = (1.0, 5.0, 25.0)  # 4 attempts


def transient(**kwargs: object) -> DeliveryError:
    return DeliveryError("451 try later", transient=True, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("attempt", "queue"), [(1, 1), (2, 2), (3, 3)])
def test_a_transient_failure_goes_to_the_retry_queue_of_its_attempt(attempt: int, queue: int) -> None:
    assert decide(transient(), attempt, DELAYS) == Retry(queue, attempt + 1, DELAYS[queue - 1])


def test_the_last_attempt_fails_with_retries_exhausted() -> None:
    assert decide(transient(), 4, DELAYS) == Fail("retries exhausted: 451 try later")


def test_a_permanent_failure_fails_at_once_with_the_providers_reason() -> None:
    assert decide(DeliveryError("550 no such user", transient=False), 1, DELAYS) == Fail("550 no such user")


def test_retry_after_picks_the_first_queue_at_least_that_long() -> None:
    assert decide(transient(retry_after=4), 1, DELAYS) == Retry(2, 3, 5.0)
    assert decide(transient(retry_after=5), 2, DELAYS) == Retry(2, 3, 5.0)
    # Longer than any queue: the longest one.
    assert decide(transient(retry_after=3600), 1, DELAYS) == Retry(3, 4, 25.0)


def test_a_deferral_waits_in_the_first_queue_and_keeps_its_attempt() -> None:
    assert decide(transient(defer=True), 3, DELAYS) == Retry(1, 3, 1.0)
    # Even on the last attempt: nothing was tried, so nothing was used up.
    assert decide(transient(defer=True), 4, DELAYS) == Retry(1, 4, 1.0)
    assert decide(transient(defer=True, retry_after=20), 4, DELAYS) == Retry(3, 4, 25.0)


def test_a_lost_message_is_sent_again_with_the_attempt_it_carried() -> None:
    from common.delivery.interface import redrive_attempt

    assert redrive_attempt("pending", 3, 4) == 1  # a manual retry starts over
    assert redrive_attempt("sending", 2, 4) == 2  # its worker is gone: the same attempt
    assert redrive_attempt("sending", 0, 4) == 1
    assert redrive_attempt("retrying", 2, 4) == 3  # the retry it was waiting for
    assert redrive_attempt("retrying", 4, 4) == 4
