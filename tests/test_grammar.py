"""The hand-written parser against the grammar: grammar/pvk.lark, run by lark's
LALR(1) parser, is the reference.

On the project's kernels and on token-level mutations of them, both must
accept the same programs, and on a syntax error both must stop at the same
token (the parser's messages say what lark's parser expected there).
"""
from __future__ import annotations

from pathlib import Path

import lark
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pvtool import parse

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "kernels").rglob("*.pvk"))
GRAMMAR = ROOT / "pvtool" / "grammar" / "pvk.lark"


@pytest.fixture(scope="module")
def reference() -> lark.Lark:
    return lark.Lark(GRAMMAR.read_text(), parser="lalr", lexer="basic")


def lark_verdict(reference: lark.Lark, text: str) -> int | None:
    """None if the grammar accepts `text`, else the offset of the token it stops at."""
    try:
        reference.parse(text)
    except lark.exceptions.UnexpectedToken as e:
        return len(text) if e.token.type == "$END" else e.token.start_pos
    return None


def parser_verdict(text: str) -> int | None:
    tokens = parse._lex(text)
    parser = parse._Parser(tokens, "t.pvk")
    try:
        while tokens.kinds[parser.i] != "$END":
            parser.item()
    except parse._Stuck as e:
        return tokens.starts[e.at]
    return None


def token_texts(text: str) -> list[str]:
    return parse._lex(text).texts[:-1]


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.stem)
def test_kernels_are_in_the_grammar(reference, path):
    text = path.read_text()
    assert lark_verdict(reference, text) is None
    assert parser_verdict(text) is None


@pytest.mark.parametrize("text", [
    "fn f() { x = 1 }", "fn f( { }", "fn f() { x = a < b < c; }", "struct S { a: u8 b: u8 }",
    "fn", "fn f() {", "var x: [u8; 4 = 1;", "fn f() { if a { } else 3; }", "fn f() -> { }",
    "fn f() { x = &&y; }", "fn f() { for i in 0.. { } }", "const C: fn(u8,) -> = 1;",
])
def test_errors_agree_with_the_grammar(reference, text):
    assert parser_verdict(text) == lark_verdict(reference, text)


VOCABULARY = sorted(parse.KEYWORDS) + ["x", "7", "'c'", '"s"', "(", ")", "{", "}", "[", "]", ";", ":", ",",
                                        ".", "..", "->", "!", "~", *parse._PRECEDENCE, *parse._ASSIGN]


@st.composite
def mutated_kernel(draw) -> str:
    texts = token_texts(draw(st.sampled_from(KERNELS)).read_text())
    start = draw(st.integers(0, len(texts) - 1))
    texts = texts[start:start + draw(st.integers(1, 120))]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(texts)))
        match draw(st.sampled_from(("insert", "delete", "swap"))):
            case "insert":
                texts.insert(i, draw(st.sampled_from(VOCABULARY)))
            case "delete" if i < len(texts):
                del texts[i]
            case "swap" if i + 1 < len(texts):
                texts[i], texts[i + 1] = texts[i + 1], texts[i]
    return " ".join(texts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(text=mutated_kernel())
def test_mutated_kernels_agree_with_the_grammar(reference, text):
    assert parser_verdict(text) == lark_verdict(reference, text)
