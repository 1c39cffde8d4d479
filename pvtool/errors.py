"""The two kinds of failure a command reports.

`USER_ERRORS` are the user's mistakes (a program that does not compile or
link): one located line, exit status 1.  `InternalError` is a broken
invariant inside pvtool, a bug: commands report it as "internal error" with
the stage and what broke, so it is never mistaken for the user's mistake.
"""
from .diagnostics import CompileError
from .linked import LinkError


class InternalError(Exception):
    """A bug in pvtool: `stage` names where the invariant broke."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


USER_ERRORS = (CompileError, LinkError)
