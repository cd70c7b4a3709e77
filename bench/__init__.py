"""Benchmarks of WhiskyPay Workers against bare Dramatiq: run them with `bench/run` (see BENCHMARKS.md)."""
