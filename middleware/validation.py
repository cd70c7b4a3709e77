"""PayloadValidation: every actor's arguments checked against its pydantic schema, at send() and before running."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from dramatiq import Broker, Message, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.logging import get_logger
from dramatiq.middleware import SkipMessage
from pydantic import BaseModel, ValidationError

from whiskypay.errors import InvalidMessage, InvalidPayload
from whiskypay.outcomes import record_failure
from whiskypay.schemas import describe, validate_args, validate_options


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class PayloadValidation(Middleware):
    """Refuse bad arguments and options at `send()` (raise `InvalidPayload`, nothing enqueued); dead-letter bad ones.

    Every send is checked, whatever options it carries: arguments against the actor's schema, options against
    `whiskypay.schemas.MessageOptions` (unknown options refused). Only in a worker process are enqueues not
    checked: they carry messages that were checked before they ran (retries, deferrals, delayed messages).

    At enqueue it also fills an omitted `timestamp` with the send time (UTC, ISO-8601); the broker bounds the
    size of the encoded message (`WhiskyPayRedisBroker`, which sees the bytes without encoding them twice).
    In the worker, a message that fails its schema is failed without running and its reason is stored in its
    `traceback` option for the dead-letter queue.

    Parameters:
      schemas: Actor name to pydantic model of its arguments; other actors pass unchecked.
      https_only: Refuse http:// callback URLs.
      required_at_send: Actor name to optional arguments that send() must be given all the same
        (WHISKYPAY_REQUIRE_MERCHANT_ID); messages already queued are not held to it.
      now_iso: The clock for default timestamps.
    """

    def __init__(
        self,
        *,
        schemas: Mapping[str, type[BaseModel]],
        https_only: bool,
        required_at_send: Mapping[str, tuple[str, ...]] | None = None,
        now_iso: Callable[[], str] = _utc_now_iso,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.schemas = dict(schemas)
        self.https_only = https_only
        self.required_at_send = dict(required_at_send or {})
        self.now_iso = now_iso
        self._in_worker = False

    def _arguments(self, message: Message[Any] | MessageProxy) -> dict[str, Any]:
        if message.args:
            raise ValueError(
                f"arguments: {len(message.args)} given by position; pass every argument by keyword, "
                f"e.g. {message.actor_name}.send(callback_url=..., ...)"
            )
        if not isinstance(message.kwargs, dict):
            raise ValueError("arguments: the keyword arguments are not an object")
        return dict(message.kwargs)

    def _problem(self, broker: Broker, message: Message[Any] | MessageProxy, *, at_send: bool) -> str | None:
        schema = self.schemas.get(message.actor_name)
        if schema is None:
            return None
        problems = []
        for check in ("arguments", "options"):
            try:
                if check == "arguments":
                    validate_args(schema, self._arguments(message), https_only=self.https_only)
                elif not isinstance(message.options, dict):
                    raise ValueError("options: are not an object")
                else:
                    validate_options(message.options, allow_unknown=not at_send)
            except ValidationError as exc:
                problems.append(describe(exc, of=check))
            except ValueError as exc:
                problems.append(str(exc))
            except Exception as exc:  # fail closed: Dramatiq ignores other errors from hooks (they would let it pass)
                problems.append(f"{check}: could not be validated ({type(exc).__name__})")
        return "; ".join(problems) or None

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self._in_worker = True

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self._in_worker = False

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        if message.actor_name not in self.schemas:
            return
        # In a worker process an enqueue carries a message that passed before_process_message (a retry, a
        # deferral) or is coming due from the delay queue; refusing it there would leave it in the worker's
        # ack set, and before_process_message dead-letters an invalid one with its reason anyway.
        problem = None if self._in_worker else self._problem(broker, message, at_send=True)
        required = () if self._in_worker else self.required_at_send.get(message.actor_name, ())
        missing = [name for name in required if message.kwargs.get(name) is None]
        if missing and not problem:
            problem = "; ".join(f"{name}: is required (WHISKYPAY_REQUIRE_MERCHANT_ID=true)" for name in missing)
        if problem:
            raise InvalidPayload(f"{message.actor_name}: {problem}. Nothing was enqueued; fix the caller.")
        if "timestamp" in self.schemas[message.actor_name].model_fields and message.kwargs.get("timestamp") is None:
            message.kwargs["timestamp"] = self.now_iso()

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        problem = self._problem(broker, message, at_send=False)
        if problem:
            self.logger.warning("Dead-lettering invalid message %s: %s", message.message_id, problem)
            record_failure(message, InvalidMessage(problem))
            message.fail()
            raise SkipMessage(problem)
