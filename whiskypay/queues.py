"""Queue names: the ones the Node/BullMQ system used, which operators and dashboards already know."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class Queue(StrEnum):
    """Our queues; the names are part of the contract and never change."""

    CALLBACKS = "callbackQueue"
    EMAIL = "emailQueue"
    #: Scheduled upkeep (check_queue_health, sent by `periodiq actors`); ours, not BullMQ's.
    MAINTENANCE = "maintenanceQueue"


class _Consuming(Protocol):
    @property
    def consumer_whitelist(self) -> set[str] | None: ...


def consumes(worker: _Consuming, queue: str) -> bool:
    """Return True if worker (a Dramatiq Worker) takes messages from queue: it lists it, or lists no queues."""
    queues = worker.consumer_whitelist
    return queues is None or queue in queues
