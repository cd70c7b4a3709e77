"""Queue names: the ones the Node/BullMQ system used, which operators and dashboards already know."""

from enum import StrEnum


class Queue(StrEnum):
    """The two queues; the names are part of the contract and never change."""

    CALLBACKS = "callbackQueue"
    EMAIL = "emailQueue"
