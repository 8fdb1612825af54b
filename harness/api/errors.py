"""User-facing errors: one line, actionable, printed by the CLI without a traceback."""


class HarnessError(Exception):
    """An error the user can fix (bad name, bad file, bad option). The CLI exits with code 2."""


class UnknownNameError(HarnessError, KeyError):
    """A model, task, subtask or config key that does not exist; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
