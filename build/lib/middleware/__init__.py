"""WhiskyPay's Dramatiq middleware, one per file; `whiskypay.broker.build_broker` lists them in order."""
