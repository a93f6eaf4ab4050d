"""Helpers shared by the runner and CLI tests."""


def summary_rows(text):
    """The rows of summary.md's main table (before the optimizers-as-built table)."""
    main = text.split("## Optimizers as built")[0]
    return [line for line in main.splitlines() if line.startswith("| `")]
