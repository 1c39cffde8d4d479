"""A bounded fuzz of the front end (parse, typecheck, lower): whatever the
input, the only failure is a CompileError, and it has a position in a file.

Inputs: arbitrary text, arbitrary bytes, and random edits of the project's
kernels (written next to a copy of kernels/lib, so their imports resolve and
the edits reach the checker and lowering).  About ten seconds in all.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pvtool.diagnostics import CompileError
from pvtool.lower import lower
from pvtool.parse import parse_program
from pvtool.typecheck import check

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "kernels").glob("*.pvk"))
# Characters that make edits interesting to the lexer and parser.
PIECES = list("{}()[];:,.*&-+!~<>=/\"'\\_x09 \n\t\0\xff") + [
    "fn ", "var ", "if ", "while ", "return ", "as ", "->", "..", "/*", "*/", "//", "0x", "<<=",
    "u8", "i64", "struct ", "import ", "9" * 30, "é", "\U0001f600"]
SETTINGS = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(ROOT / "kernels" / "lib", root / "lib")
    return root


def front_end(path: Path) -> None:
    """Compile `path` as far as IR; a CompileError must say where."""
    try:
        lower(check(parse_program(str(path))))
    except CompileError as e:
        assert e.loc is not None and e.loc.file and e.message, e
        assert e.loc.line >= 1 or e.message.startswith("cannot read"), e
        assert "\n" not in e.message, e
        e.format()


@SETTINGS
@given(text=st.text(max_size=400))
def test_random_text(workdir, text):
    path = workdir / "text.pvk"
    path.write_text(text, errors="surrogatepass")
    front_end(path)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes(workdir, data):
    path = workdir / "bytes.pvk"
    path.write_bytes(data)
    front_end(path)


@st.composite
def edited_kernel(draw) -> str:
    text = draw(st.sampled_from(KERNELS)).read_text()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(0, 12)))
        match draw(st.sampled_from(("insert", "delete", "replace", "duplicate"))):
            case "insert":
                text = text[:i] + draw(st.sampled_from(PIECES)) + text[i:]
            case "delete":
                text = text[:i] + text[j:]
            case "replace":
                text = text[:i] + draw(st.sampled_from(PIECES)) + text[j:]
            case "duplicate":
                text = text[:j] + text[i:j] + text[j:]
    return text


@settings(SETTINGS, max_examples=250)
@given(text=edited_kernel())
def test_edited_kernels(workdir, text):
    path = workdir / "edited.pvk"
    path.write_text(text, errors="surrogatepass")
    front_end(path)
