"""The two kinds of failure a command reports.

A `UserError` is the user's mistake (a program that does not compile or
link): one located line, exit status 1.  `InternalError` is a broken
invariant inside pvtool, a bug: commands report it as "internal error" with
the stage and what broke, so it is never mistaken for the user's mistake.
This module imports nothing of pvtool's, so every stage may use it.
"""


class UserError(Exception):
    """The base of CompileError and LinkError."""


class InternalError(Exception):
    """A bug in pvtool: `stage` names where the invariant broke."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


USER_ERRORS = (UserError,)
