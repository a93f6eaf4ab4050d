"""The one error a bad experiment description raises."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A bad config, option or data path; the message is one line naming the problem and the valid choices.

    Raised while the grid is being prepared, before any training starts.
    """
