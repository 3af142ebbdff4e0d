"""The words every service, the topology, the store and the API agree on: channels, statuses and
the events a client's webhook can hear. A new channel is one line here (and its worker)."""

from __future__ import annotations

CHANNELS = ("email", "push", "in_app")
# A route segment matching a channel, e.g. "/api/v1/{channel:email|push}/status".
CHANNEL_PATTERN = "|".join(CHANNELS)

# A notification's life: accepted as scheduled/pending (or skipped), then sending and retrying,
# and it ends in one of the final ones.
STATUSES = ("scheduled", "pending", "sending", "retrying", "delivered", "failed", "skipped", "cancelled")
FINAL_STATUSES = ("delivered", "failed", "skipped", "cancelled")
# The statuses from which a failed notification's retry makes no sense: it ended otherwise.
ENDED_OTHERWISE = ("delivered", "skipped", "cancelled")

# A workflow run's life: running or waiting (on a timer or its step's notification), then final.
ACTIVE_RUN = ("running", "waiting")
# merged: its event joined another run's digest window; throttled: a throttle step held it back.
FINAL_RUN = ("completed", "cancelled", "failed", "merged", "throttled")
RUN_STATUSES = ACTIVE_RUN + FINAL_RUN


def sql_list(values: tuple[str, ...]) -> str:
    """A tuple of these words as an SQL list literal, for statements built once at import."""
    return ", ".join(f"'{v}'" for v in values)


# What a client's status webhook may subscribe to: one per final status, and a bounce.
EVENT_TYPES = (
    "notification.delivered",
    "notification.failed",
    "notification.bounced",
    "notification.skipped",
    "notification.cancelled",
    # An in-app notification's message seen (shown in an open inbox) or read by its user.
    "notification.seen",
    "notification.read",
)
