"""The push provider interface: send one message to some devices, a result per device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# delivered: accepted by the push service. failed: will not work (permanent). retry: try again
# later (429, 5xx, timeout). removed: the token or subscription is dead; delete the device.
Outcome = Literal["delivered", "failed", "retry", "removed"]


@dataclass(frozen=True)
class Device:
    id: str
    platform: str
    token: str
    subscription: dict[str, Any] | None = None


@dataclass(frozen=True)
class PushMessage:
    notification_id: str
    title: str
    body: str
    image_url: str | None
    link: str | None
    language: str
    ttl: int
    data: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceResult:
    device: Device
    outcome: Outcome
    detail: str = ""
    retry_after: float | None = None


class PushProvider(Protocol):
    platform: str

    async def send(self, devices: list[Device], message: PushMessage) -> list[DeviceResult]:
        """Deliver to each device; never raises for a device's failure (it is a result)."""


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds (delta form only; an HTTP date is treated as absent)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def http_outcome(status: int) -> Outcome:
    """The shared table for push HTTP APIs: 2xx ok; 429 and 5xx retry; other 4xx permanent."""
    if 200 <= status < 300:
        return "delivered"
    if status == 429 or status >= 500:
        return "retry"
    return "failed"
