"""Retry with exponential back-off for instruments that stop answering (config [retry])."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from insitu_daq.core.config import RetryConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


def backoff_delays(retry: RetryConfig) -> Iterator[float]:
    """Delays before each retry: first_delay_s doubling up to max_delay_s, attempts - 1 of them."""
    delay = retry.first_delay_s
    for _ in range(retry.attempts - 1):
        yield delay
        delay = min(delay * 2.0, retry.max_delay_s)


def call_with_retries(
    call: Callable[[], T],
    retry: RetryConfig,
    retryable: tuple[type[BaseException], ...],
    reconnect: Callable[[], None] | None = None,
    on_retry: Callable[[int, BaseException], None] | None = None,
    stop: threading.Event | None = None,
) -> T:
    """`call()`, retried on `retryable` errors after a reconnect, with back-off.

    The last error is raised once `retry.attempts` calls have failed (or `stop` is set).
    """
    delays = backoff_delays(retry)
    attempt = 1
    while True:
        try:
            return call()
        except retryable as exc:
            delay = next(delays, None)
            if delay is None or (stop is not None and stop.is_set()):
                raise
            log.warning("attempt %d failed (%s); retrying in %.2f s", attempt, exc, delay)
            if on_retry is not None:
                on_retry(attempt, exc)
            if (stop or threading.Event()).wait(delay):
                raise
            attempt += 1
            if reconnect is not None:
                try:
                    reconnect()
                except retryable as reconnect_error:
                    log.warning("reconnect failed: %s", reconnect_error)
