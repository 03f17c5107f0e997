"""How a fetch ends when it does not end well: refused input (nothing touched) or missing shards."""
from __future__ import annotations


class FetchError(Exception):
    """A problem with what the user asked for. `param` names the offending option (for the CLI)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class FetchIncomplete(Exception):
    """The run ended with shards missing (interrupted, img2dataset failed, or shards that failed twice): rerun
    to resume."""

    def __init__(self, message: str, summary: dict | None, signal_number: int | None = None):
        super().__init__(message)
        self.summary, self.signal_number = summary, signal_number

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number if self.signal_number else 1
