"""WhiskyPay Workers: signed webhook delivery and payment emails on Dramatiq; helpers shared by actors and tools."""
