"""The errors a user can cause, so commands report them in one line and exit non-zero.

Internal errors (a broken invariant in a stage) are not listed: they are bugs
and keep their traceback.
"""
from .diagnostics import CompileError
from .link import LinkError

USER_ERRORS = (CompileError, LinkError)
