"""The one error a bad experiment description raises, and a collector that reports every mistake at once."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["ConfigError", "Problems"]


class ConfigError(ValueError):
    """A bad config, option, data path or output folder; the message is one line naming each problem
    and the valid choices.

    Raised while the grid is being prepared, before any training starts. ``problems`` holds the
    separate messages when several mistakes were found at once.
    """

    def __init__(self, message: str | list[str]) -> None:
        problems = [message] if isinstance(message, str) else list(message)
        self.problems = problems
        if len(problems) == 1:
            text = problems[0]
        else:
            text = f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        super().__init__(text)


class Problems:
    """Collects :class:`ConfigError` messages so that a config's mistakes are all reported together.

    Usage::

        problems = Problems()
        with problems.collect():
            check_one_thing()       # a ConfigError here is kept, and checking goes on
        problems.raise_if_any()     # one ConfigError naming every problem
    """

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        """Keep one problem."""
        if message not in self.messages:
            self.messages.append(message)

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Run a block of checks; a ConfigError it raises is kept instead of propagating."""
        try:
            yield
        except ConfigError as exc:
            for message in exc.problems:
                self.add(message)

    def raise_if_any(self) -> None:
        """Raise one ConfigError with every problem kept so far."""
        if self.messages:
            raise ConfigError(self.messages)
