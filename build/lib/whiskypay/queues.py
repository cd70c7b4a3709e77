"""Queue names: the ones the Node/BullMQ system used, which operators and dashboards already know."""

from enum import StrEnum


class Queue(StrEnum):
    """Our queues; the names are part of the contract and never change."""

    CALLBACKS = "callbackQueue"
    EMAIL = "emailQueue"
    #: Scheduled upkeep (check_queue_health, sent by `periodiq actors`); ours, not BullMQ's.
    MAINTENANCE = "maintenanceQueue"
