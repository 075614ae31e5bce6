"""The one exception type users see: a short message that says what to do."""


class KbenchError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""


class Unavailable(Exception):
    """An inference runtime can't serve the model on this machine; the message says why (its rows say
    ``unavailable: <why>``, never a quiet fallback)."""


# A SIGINT/SIGTERM that arrived (signal number), kept even where Python swallowed the KeyboardInterrupt
# it raised (in a garbage-collection callback, say): training stops at its first batch, and the CLI
# never reports success after it.
STOP_REQUESTS: list[int] = []


class TrainingInterrupted(KbenchError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint that ``--resume`` continues."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


def first_line(error: BaseException | str, limit: int = 300, named: bool = False) -> str:
    """An error's message for a one-line report: its first non-blank line (libraries' messages run
    to pages of context), after ``Type: `` with ``named``, cut to ``limit`` characters. An exception
    without a message gives its type's name.

    >>> first_line(ValueError("bad size\\n  in layer 3"), named=True)
    'ValueError: bad size'
    """
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else ""
    if isinstance(error, BaseException):
        name = type(error).__name__
        line = (f"{name}: {line}" if named else line) if line else name
    return line[:limit]
