"""The delivery channels: the one list every service, the topology and the store agree on."""

from __future__ import annotations

CHANNELS = ("email", "push")
