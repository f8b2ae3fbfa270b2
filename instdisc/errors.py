"""Errors that stop a stage with a message for the user (no traceback): torch-free on purpose,
so that the CLI can catch them without importing torch."""


class StageError(RuntimeError):
    """A stage cannot go on (a non-finite loss, a failed parity gate...); the message says why."""
