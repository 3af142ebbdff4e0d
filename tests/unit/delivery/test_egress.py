"""The egress guard's check at creation: every form a resolver reads as a non-public address is
refused before any connection; public names and addresses pass."""

from __future__ import annotations

import pytest

from common.delivery.egress import UnsafeEndpoint, check_endpoint

NONE_ALLOWED: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1",  # shortened
        "0177.0.0.1",  # octal
        "0x7f.0.0.1",
        "0x7f.1",
        "2130706433",  # one decimal number
        "0x7f000001",
        "127.0.0.1.",  # a trailing dot
        "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # full-width digits
        "127。0。0。1",  # ideographic full stops
        "①②⑦.0.0.1",  # circled digits fold to 127
        "10.0.0.1",
        "169.254.169.254",  # cloud metadata
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[64:ff9b::7f00:1]",
    ],
)
def test_non_public_addresses_in_any_spelling_are_refused(host: str) -> None:
    with pytest.raises(UnsafeEndpoint, match="not a public address"):
        check_endpoint(f"https://{host}/hook", NONE_ALLOWED)


@pytest.mark.parametrize("host", ["example.com", "93.184.216.34", "8.8.8.8", "1e100.net", "0x.example"])
def test_public_names_and_addresses_pass(host: str) -> None:
    check_endpoint(f"https://{host}/hook", NONE_ALLOWED)


def test_http_and_allow_listed_hosts() -> None:
    with pytest.raises(UnsafeEndpoint, match="not https"):
        check_endpoint("http://example.com/hook", NONE_ALLOWED)
    check_endpoint("http://127.0.0.1:8080/hook", frozenset({"127.0.0.1:8080"}))
