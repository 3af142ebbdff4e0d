"""The engine: takes due runs from PostgreSQL and moves each as far as it can go.

A run is due when it is new, when its timer is reached, when its step's notification became final
(the wake-up trigger of migration 020), or when the lease of an engine that took it ran out. The
engine takes a page of due runs (`WorkflowStore.take_due`, SKIP LOCKED, so several gateways share
them), and for each: settles the step it waited on, then decides step after step (`steps.py`)
until one must wait (a timer, a notification) or the run is done, and writes the result with one
compare-and-set. A channel step's notification is keyed by run and step, so an engine that dies
after making it and before writing makes no second one when the run is taken again.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from common.background import sleep
from common.data.db import Row
from common.faults import is_infrastructure
from common.features.workflows.definition import Definition, Step
from common.features.workflows.digests import DigestStore
from common.features.workflows.steps import (
    Digest,
    Done,
    Send,
    Skip,
    Throttle,
    Wait,
    context,
    next_action,
    settle_channel,
)
from common.features.workflows.store import WorkflowStore
from common.vocabulary import FINAL_STATUSES

log = logging.getLogger("workflows.engine")

LEASE = 30.0  # seconds an engine holds a run it took; then another may take it
RECHECK = 30.0  # seconds before a waiting channel step is looked at again without a wake-up
BATCH = 200  # runs taken per round


class StepFailed(Exception):
    """A channel step that cannot make its notification for a reason that is not the
    infrastructure's (the user was erased, the template is gone): the step fails with it."""


class Sender(Protocol):
    async def send(
        self, run: Row, step: Step, definition: Definition, digest: dict[str, Any] | None = None
    ) -> Row:
        """The step's notification (made now, or the one made before for this run and step):
        a row with at least `id`, `status`, `error`; `digest` is what the last digest step
        gathered, for the template. Raises StepFailed."""
        ...

    async def cancel(self, project_id: str, notification_id: uuid.UUID) -> None:
        """Cancel a notification the run made, if it has not gone out yet."""
        ...


@dataclass
class Counters:
    advanced: int = 0
    completed: int = 0
    lost: int = 0  # writes that found the run changed by someone else


class Engine:
    def __init__(
        self,
        store: WorkflowStore,
        sender: Sender,
        *,
        batch: int = BATCH,
        lease: float = LEASE,
        recheck: float = RECHECK,
        concurrency: int = 32,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.digests = DigestStore(store.db)
        self.sender = sender
        self.batch = batch
        self.lease = lease
        self.recheck = recheck
        self.now = now
        self.counters = Counters()
        self._limit = asyncio.Semaphore(concurrency)
        self.wake = asyncio.Event()

    async def round(self) -> int:
        """One page of due runs advanced; how many were taken."""
        runs = await self.store.take_due(self.batch, self.lease)
        if runs:
            await asyncio.gather(*(self._guarded(run) for run in runs))
        return len(runs)

    async def _guarded(self, run: Row) -> None:
        async with self._limit:
            try:
                await self.advance(run)
            except Exception as exc:  # noqa: BLE001 - the run is due again when its lease ends
                level = logging.INFO if is_infrastructure(exc) else logging.WARNING
                log.log(level, "run %s not advanced: %s: %s", run["id"], type(exc).__name__, exc)

    async def loop(self, stopping: asyncio.Event, interval: float) -> None:
        """Rounds until asked to stop: at once again after a full page, else after `interval`
        seconds or as soon as a trigger wakes it."""
        while not stopping.is_set():
            taken = 0
            try:
                taken = await self.round()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("workflow round failed: %s: %s", type(exc).__name__, exc)
            if taken >= self.batch:
                continue
            self.wake.clear()
            waker = asyncio.ensure_future(self.wake.wait())
            try:
                await asyncio.wait(
                    {waker, asyncio.ensure_future(sleep(stopping, interval))},
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                waker.cancel()

    async def advance(self, run: Row) -> None:
        definition = await self.store.definition(run["project_id"], run["workflow_key"], run["version"])
        if definition is None:
            await self._write(
                run, "failed", run["step_index"], run["steps"], reason="workflow version is gone"
            )
            return
        states: list[dict[str, Any]] = [dict(s) for s in run["steps"]]
        index = int(run["step_index"])
        now = self.now()
        waited = [
            uuid.UUID(s["notification_id"])
            for s in states
            if s["status"] == "waiting" and "notification_id" in s
        ]
        notifications = await self.store.notification_statuses(waited)
        self.counters.advanced += 1
        gathered = await self._gathered(definition, states, index)
        while index < len(definition.steps):
            step, state = definition.steps[index], states[index]
            if state["status"] == "waiting":
                if step.channel is not None:
                    found = notifications.get(uuid.UUID(state["notification_id"]))
                    if found is None or found["status"] not in FINAL_STATUSES:
                        await self._wait_notification(run, index, states, uuid.UUID(state["notification_id"]))
                        return
                    settle_channel(state, found["status"], found.get("error"))
                else:
                    due = datetime.fromisoformat(state["due_at"])
                    if due > now:
                        await self._write(run, "waiting", index, states, due_at=due)
                        return
                    if step.type == "digest":
                        gathered = await self._close(step, state)
                    else:
                        state["status"] = "completed"
                index += 1
                continue
            inbox = await self._inbox_states(step, states[:index])
            scope = context(run["payload"], run["recipient"], states[:index], gathered, inbox)
            action = next_action(step, scope, now)
            if isinstance(action, Skip):
                state.update(status="skipped", reason=action.reason)
            elif isinstance(action, Done):
                state["status"] = "completed"
            elif isinstance(action, Wait):
                state.update(status="waiting", due_at=action.until.isoformat())
                await self._write(run, "waiting", index, states, due_at=action.until)
                return
            elif isinstance(action, Throttle):
                if not await self.digests.throttle(run, step.name, action.key, action.limit, action.window):
                    keyed = f" and key {action.key!r}" if action.key else ""
                    reason = (
                        f"throttled: {action.limit} run(s) of this user{keyed} passed {step.name!r}"
                        f" within the last {action.window:g} s"
                    )
                    state.update(status="throttled", reason=reason)
                    await self._end(run, "throttled", index, states, reason)
                    return
                state["status"] = "completed"
            elif isinstance(action, Digest):
                window = await self.digests.join(
                    run, step.name, action.key, action.closes_at, action.lookback
                )
                state.update(
                    digest_id=str(window.id),
                    opened_at=window.opened_at.isoformat(),
                    closes_at=window.closes_at.isoformat(),
                )
                if window.carrier != run["id"]:
                    reason = f"merged into the digest of run {window.carrier}"
                    state.update(status="merged", merged_into=str(window.carrier))
                    await self._end(run, "merged", index, states, reason, merged_into=window.carrier)
                    return
                if window.status == "cancelled":
                    state.update(status="cancelled", reason="digest window cancelled")
                elif window.status == "open" and window.closes_at > now:
                    state.update(status="waiting", due_at=window.closes_at.isoformat())
                    await self._write(run, "waiting", index, states, due_at=window.closes_at)
                    return
                else:
                    gathered = await self._close(step, state)
            elif isinstance(action, Send):
                try:
                    made = await self.sender.send(run, step, definition, gathered)
                except StepFailed as exc:
                    state.update(status="failed", reason=str(exc))
                    index += 1
                    continue
                state["notification_id"] = str(made["id"])
                if made["status"] not in FINAL_STATUSES:
                    state["status"] = "waiting"
                    await self._wait_notification(run, index, states, made["id"])
                    return
                settle_channel(state, made["status"], made.get("error"))
            index += 1
        await self._write(run, "completed", index, states)
        self.counters.completed += 1

    async def _close(self, step: Step, state: dict[str, Any]) -> dict[str, Any]:
        """The carrier's window closed: its step completes with the count, and what it held
        goes to the next steps as `digest`."""
        held = await self.digests.close(
            uuid.UUID(state["digest_id"]), int(step.options.get("max_events", 100))
        )
        state.pop("due_at", None)
        state.update(status="completed", count=held["count"], closed_at=held["closed_at"].isoformat())
        return _digest_view(held)

    async def _gathered(
        self, definition: Definition, states: list[dict[str, Any]], index: int
    ) -> dict[str, Any] | None:
        """What the last completed digest step before `index` gathered, read again (a run taken
        up after its window closed)."""
        for i in range(min(index, len(states)) - 1, -1, -1):
            state = states[i]
            if state.get("type") == "digest" and state["status"] == "completed" and state.get("digest_id"):
                max_events = int(definition.steps[i].options.get("max_events", 100))
                return _digest_view(await self.digests.held(uuid.UUID(state["digest_id"]), max_events))
        return None

    async def _end(
        self,
        run: Row,
        status: str,
        index: int,
        states: list[dict[str, Any]],
        reason: str,
        merged_into: uuid.UUID | None = None,
    ) -> None:
        """The run ends at this step (merged, throttled): the steps after it will not run."""
        for later in states[index + 1 :]:
            later.update(status="skipped", reason=f"run {status}")
        await self._write(run, status, index, states, reason=reason, merged_into=merged_into)

    async def cancel(
        self,
        project_id: str,
        *,
        reason: str,
        run_id: uuid.UUID | None = None,
        workflow_key: str | None = None,
        cancellation_key: str | None = None,
        user_id: str | None = None,
    ) -> int:
        """The runs chosen stopped before their next step (`WorkflowStore.cancel`), and what they
        made that is not out yet (scheduled, or pending and not claimed) cancelled too; how many
        runs stopped. The API's cancel by key and the console's cancel of one run both come here."""
        cancelled = await self.store.cancel(
            project_id,
            reason=reason,
            run_id=run_id,
            workflow_key=workflow_key,
            cancellation_key=cancellation_key,
            user_id=user_id,
        )
        for run in cancelled:
            for state in run["steps"]:
                if state.get("notification_id") and state.get("notification_status") not in FINAL_STATUSES:
                    await self.sender.cancel(project_id, uuid.UUID(state["notification_id"]))
        return len(cancelled)

    async def _inbox_states(self, step: Step, earlier: list[dict[str, Any]]) -> dict[uuid.UUID, Row]:
        """The read state of earlier in-app steps' messages, for a condition that may ask."""
        if step.condition is None:
            return {}
        ids = [
            uuid.UUID(s["notification_id"])
            for s in earlier
            if s.get("type") == "in_app" and s.get("notification_id")
        ]
        return await self.store.inbox_states(ids)

    async def _wait_notification(
        self, run: Row, index: int, states: list[dict[str, Any]], notification_id: uuid.UUID
    ) -> None:
        written = await self.store.wait_for_notification(run, index, states, notification_id, self.recheck)
        if not written:
            await self._lost(run, notification_id)

    async def _write(
        self,
        run: Row,
        status: str,
        index: int,
        states: list[dict[str, Any]],
        *,
        due_at: datetime | None = None,
        reason: str | None = None,
        merged_into: uuid.UUID | None = None,
    ) -> None:
        written = await self.store.write(
            run,
            status=status,
            step_index=index,
            steps=states,
            due_at=due_at,
            reason=reason,
            merged_into=merged_into,
        )
        if not written:
            await self._lost(run, None)

    async def _lost(self, run: Row, made: uuid.UUID | None) -> None:
        """Someone wrote the run since it was taken: another engine (then it did the same step and
        its notification is this one), or a cancel, which must also stop what this engine made."""
        self.counters.lost += 1
        if made is None:
            return
        current = await self.store.run(run["project_id"], run["id"])
        if current is not None and current["status"] == "cancelled":
            await self.sender.cancel(run["project_id"], made)


def _digest_view(held: dict[str, Any]) -> dict[str, Any]:
    return {k: held[k] for k in ("count", "events", "first", "last")}


Starter = Callable[[asyncio.Event], Awaitable[None]]
