"""The two kinds of failure a command reports.

A `UserError` is the user's mistake (a program that does not compile or
link): one located line, exit status 1.  `InternalError` is a broken
invariant inside pvtool, a bug: commands report it as "internal error" with
the stage and what broke, so it is never mistaken for the user's mistake.
`Rules`, a stage's dispatch table by node class, raises one for a class it
has no rule for.
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


class Rules(dict):
    """A stage's dispatch table, node class -> how the stage handles it; any other class is a
    broken invariant (`what` begins the message, the class's name ends it)."""

    def __init__(self, stage: str, what: str, rules: dict):
        super().__init__(rules)
        self.stage, self.what = stage, what

    def __missing__(self, kind: type) -> None:
        raise InternalError(self.stage, f"{self.what} {kind.__name__}")


USER_ERRORS = (UserError,)
