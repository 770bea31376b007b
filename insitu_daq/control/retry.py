"""Retry with exponential back-off for instruments that stop answering (config [retry])."""

from __future__ import annotations

import logging
import threading
import time
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


# How long a guardian keeps trying to make an instrument safe: nobody else is left to do it.
PERSIST_S = 600.0


def keep_trying(
    call: Callable[[], None],
    what: str,
    retry: RetryConfig,
    retryable: tuple[type[BaseException], ...],
    persist_s: float = PERSIST_S,
    fatal: tuple[type[BaseException], ...] = (),
) -> bool:
    """`call()` with retries, and those again every `retry.max_delay_s` for `persist_s`.

    For making `what` (an instrument, named in the log) safe when nothing else will: True
    once a call succeeded, False (logged critical) when `persist_s` has passed without one.
    A `fatal` error (checked before `retryable`, which may include it) is raised at once:
    persisting cannot change its verdict.
    """
    deadline = time.monotonic() + persist_s
    while True:
        try:
            call_with_retries(call, retry, retryable)
            return True
        except fatal:
            raise
        except retryable as exc:
            if time.monotonic() >= deadline:
                log.critical("%s NOT made safe after trying for %.0f s: %s", what, persist_s, exc)
                return False
            log.error("%s not reachable (%s); still trying", what, exc)
            time.sleep(retry.max_delay_s)
