"""The one entry point: `dramatiq actors`, `periodiq actors`, the gateway and the dashboard all import this.

It builds the broker from settings and sets it *before* any actor is declared, so every actor binds to it.
"""

import dramatiq

from settings import get_settings
from whiskypay.broker import build_broker

broker = build_broker(get_settings())
dramatiq.set_broker(broker)

from actors.callbacks import send_callback  # noqa: E402  declared only after set_broker
from actors.email import send_email  # noqa: E402
from actors.health import check_queue_health  # noqa: E402

__all__ = ["broker", "check_queue_health", "send_callback", "send_email"]
