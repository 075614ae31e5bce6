"""The one exception type users see: a short message that says what to do."""


class KbenchError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""


class TrainingInterrupted(KbenchError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint that ``--resume`` continues."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
