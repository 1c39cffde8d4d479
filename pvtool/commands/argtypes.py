"""Argument types the subcommands share: each turns bad text into argparse's one-line usage error."""
from __future__ import annotations

import argparse
import math


def seconds(text: str) -> float:
    """A finite, non-negative number of seconds (`--timeout 0` means no limit where a command says so)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite, non-negative number of seconds, not {text!r}")
    return value


def whole_number(minimum: int):
    """A type for whole numbers of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError("must not be negative" if minimum == 0 else f"must be at least {minimum}")
        return value
    return parse


def one_of(names, what: str):
    """A type for one of `names` (e.g. a benchmark's kernels), saying which there are when it is not."""
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r} (choose from {', '.join(names)})")
        return text
    return parse
