"""control/retry.py's keep_trying: how the guardian and `insitu-daq safe` persist in making an
instrument safe (the source-meter's bias, a heating holder's heater). Pure functions over a
call that fails as told; no instrument is needed to say when it gives up."""

from __future__ import annotations

import pytest

from insitu_daq.control.retry import keep_trying
from insitu_daq.core.config import RetryConfig

FAST = RetryConfig(attempts=3, first_delay_s=0.001, max_delay_s=0.001)


class RefusedError(ValueError):
    """Like LimitError: a ValueError, so a driver-error tuple would retry it too."""


def test_keeps_trying_until_the_instrument_answers_and_gives_up_only_after_persist_s() -> None:
    calls: list[int] = []

    def comes_back_on_the_fifth_call() -> None:
        calls.append(1)
        if len(calls) < 5:
            raise OSError("no answer")

    # Three attempts a round: the first round fails, the second succeeds on its second call.
    assert keep_trying(comes_back_on_the_fifth_call, "thing", FAST, (OSError,), persist_s=60.0)
    assert len(calls) == 5

    calls.clear()

    def never_answers() -> None:
        calls.append(1)
        raise OSError("no answer")

    assert not keep_trying(never_answers, "thing", FAST, (OSError,), persist_s=0.0)
    assert len(calls) == FAST.attempts  # one round of retries, then the verdict


def test_a_fatal_error_is_raised_at_once_though_it_is_retryable_too() -> None:
    calls: list[int] = []

    def refused() -> None:
        calls.append(1)
        raise RefusedError("level beyond the limits")

    with pytest.raises(RefusedError):
        keep_trying(refused, "thing", FAST, (ValueError,), persist_s=60.0, fatal=(RefusedError,))
    # call_with_retries retries a ValueError; keep_trying does not persist past that round.
    assert len(calls) == FAST.attempts
