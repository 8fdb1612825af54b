"""User-facing errors: one line, actionable, printed by the CLI without a traceback."""


class HarnessError(Exception):
    """An error the user can fix (bad name, bad file, bad option). The CLI exits with code 2."""


class UnknownNameError(HarnessError, KeyError):
    """A model, task, subtask or config key that does not exist; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none): the form
    every one-line error quotes a library's or a reproduction's exception in."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
