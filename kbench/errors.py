"""The one exception type users see: a short message that says what to do."""


class KbenchError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""


# A SIGINT/SIGTERM that arrived (signal number), kept even where Python swallowed the KeyboardInterrupt
# it raised (in a garbage-collection callback, say): training stops at its first batch, and the CLI
# never reports success after it.
STOP_REQUESTS: list[int] = []


class TrainingInterrupted(KbenchError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint that ``--resume`` continues."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
