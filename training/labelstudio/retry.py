"""When a failed Label Studio request is tried again, and how long to wait before it.

One rule for every request valve-id sends to Label Studio, its API calls and its image
downloads alike: a connection error, a timeout, HTTP 5xx, 408 or 429 is *transient* and is
retried after each delay of a :class:`Retry` in turn; anything else is Label Studio's answer
and is reported at once. label-studio-sdk's own retries stay off (``max_retries=0``), so the
two never multiply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from training.shared.errors import ValveIdError

__all__ = ["NO_RETRY", "Retry", "is_transient_status"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_STATUSES = frozenset({408, 429})


def is_transient_status(status: int | None) -> bool:
    """A status worth trying again: none at all (no answer), 5xx, 408 or 429."""
    return status is None or status >= 500 or status in _TRANSIENT_STATUSES


@dataclass(frozen=True)
class Retry:
    """Waits between tries: ``delays_s[i]`` before try ``i + 2`` (so ``len + 1`` tries)."""

    delays_s: tuple[float, ...] = (0.5, 1.0, 2.0)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    @classmethod
    def exponential(
        cls, attempts: int, first_s: float = 0.5, sleep: Callable[[float], None] = time.sleep
    ) -> Retry:
        """``attempts`` tries, waiting ``first_s`` and doubling the wait after each failure."""
        return cls(tuple(first_s * 2**i for i in range(max(1, attempts) - 1)), sleep)

    @property
    def attempts(self) -> int:
        """Tries in all, the first one included."""
        return len(self.delays_s) + 1

    def at_least(self, attempts: int) -> Retry:
        """This policy stretched to ``attempts`` tries, the added waits doubling the last."""
        delays = list(self.delays_s)
        while len(delays) + 1 < attempts:
            delays.append(delays[-1] * 2 if delays else 0.5)
        return replace(self, delays_s=tuple(delays))

    def call(
        self,
        action: Callable[[], T],
        *,
        what: str,
        catch: tuple[type[Exception], ...],
        transient: Callable[[Exception], bool],
        error: Callable[[Exception, int], Exception],
    ) -> T:
        """``action()``, tried again after a ``transient`` failure of a ``catch`` type.

        The last failure (or the first one that is not transient) is raised as
        ``error(exception, tries made)``, which writes the message the caller's user reads.
        """
        for attempt, delay in enumerate((*self.delays_s, None), start=1):
            try:
                return action()
            except catch as exc:
                if delay is None or not transient(exc):
                    raise error(exc, attempt) from None
                logger.warning(
                    "Label Studio: %s failed (%s); retrying in %.1f s (%d/%d)",
                    what,
                    _describe(exc),
                    delay,
                    attempt,
                    self.attempts,
                )
                self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


NO_RETRY = Retry(())
"""One try only: for requests someone is waiting on (the backend's ``/predict`` images)."""


def _describe(exc: Exception) -> str:
    """Status or kind only: an SDK error's text holds bodies that may echo the key."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    return str(exc) if isinstance(exc, ValveIdError) else type(exc).__name__
