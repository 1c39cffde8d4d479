"""Differential test: random expressions over every integer type, machine vs. oracle.

tests/gen_exprs.py writes one kernel holding a few hundred random
expressions (literals, parameters and locals of u8..i64, the arithmetic,
bitwise, shift, unary, comparison and logical operators, casts) and
computes each value in Python from docs/language.md.  The kernel is built
for both targets and run four ways (native on QEMU, native on the runtime
in bare and trap mode, PV on the runtime); each must print exactly the
oracle's values.  To reproduce a failing seed: `python tests/gen_exprs.py SEED`.
"""
from __future__ import annotations

import pytest

import gen_exprs
import qemu
from gen_exprs import INT_TYPES, Case, Program, binary, convert
from pvtool import driver
from runtime import hypervisor

WAYS = (pytest.param("qemu", marks=pytest.mark.qemu), "bare", "trap", "pv")
FAST_SEEDS = (1, 2, 3)
SLOW_SEEDS = tuple(range(10, 16))


def console_of(image: bytes, way: str) -> str:
    if way == "qemu":
        if not qemu.available():
            pytest.skip(f"{qemu.QEMU} is not installed")
        console, status = qemu.boot(image, timeout=60)
    else:
        result = hypervisor.run(image, way, timeout=120)
        assert result.reason == "shutdown", f"{way}: {result.reason}: {result.message}"
        console, status = result.console.decode("latin-1"), result.status
    assert status == 0, f"{way}: exit status {status}"
    return console


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(seed, count, depth) -> (Program, {target: image}), each built once."""
    cache: dict = {}

    def build(seed: int, count: int, depth: int) -> tuple[Program, dict[str, bytes]]:
        key = (seed, count, depth)
        if key not in cache:
            prog = gen_exprs.program(seed, count, depth=depth)
            path = tmp_path_factory.mktemp("diff") / f"exprs_{seed}.pvk"
            path.write_text(prog.text)
            cache[key] = prog, {t: driver.compile_file(str(path), t) for t in driver.TARGETS}
        return cache[key]
    return build


def check_way(built, seed: int, way: str, count: int, depth: int) -> None:
    prog, images = built(seed, count, depth)
    console = console_of(images["pv" if way == "pv" else "native"], way)
    wrong = prog.mismatches(console)
    assert not wrong, (f"{way}: {len(wrong)}+ mismatches (program: gen_exprs.program({seed}, {count}, "
                       f"depth={depth}))\n" + "\n".join(wrong))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_random_expressions(built, seed, way):
    check_way(built, seed, way, count=200, depth=4)


@pytest.mark.slow
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_random_expressions_deeper(built, seed, way):
    check_way(built, seed, way, count=250, depth=5)


# -- the oracle and the generator themselves ------------------------------------------------------

def test_oracle_agrees_with_the_documented_examples():
    i8, i64, u8, u64 = (INT_TYPES[n] for n in ("i8", "i64", "u8", "u64"))
    assert binary("/", i64, -7, 2) == -3
    assert binary("%", i64, -7, 2) == -1
    assert binary("%", i64, 7, -2) == 1
    assert binary(">>", i64, -16, 2) == -4
    assert binary("+", u8, 0xFF, 1) == 0
    assert binary("-", u64, 0, 1) == 18446744073709551615
    assert binary("/", i8, -128, -1) == -128          # narrow signed division wraps
    assert binary("<<", u8, 1, 8) == 0 and binary(">>", i8, -1, 63) == -1 and binary(">>", u8, 0x80, 9) == 0
    assert convert(200, "i8") == -56
    assert convert(convert(-1, "i8"), "u16") == 65535
    assert convert(-1, "u64") == (1 << 64) - 1


def test_generator_covers_every_type_and_operator():
    cases = [c for seed in FAST_SEEDS for c in gen_exprs.program(seed, 200).cases]
    assert {c.type for c in cases} == set(INT_TYPES) | {"bool"}
    text = " ".join(c.text for c in cases)
    for op in (" + ", " - ", " * ", " / ", " % ", " & ", " | ", " ^ ", " << ", " >> ", "(-", "(~", "(!",
               " == ", " != ", " < ", " <= ", " > ", " >= ", " && ", " || ", " as "):
        assert op in text, f"no {op.strip()!r} in the generated expressions"
    for name in INT_TYPES:
        assert f" as {name})" in text, f"no cast to {name}"


def test_generator_is_deterministic():
    assert gen_exprs.program(5, 50).text == gen_exprs.program(5, 50).text
    assert gen_exprs.program(5, 50).text != gen_exprs.program(6, 50).text


def test_a_wrong_value_is_reported_with_its_expression():
    prog = Program(7, "", [Case("(v1 + 3)", "u8", 2), Case("(p0 >> 1)", "i16", -1)])
    wrong = prog.mismatches("2\nfffe\ndone\n")
    assert wrong == ["seed 7 case 1: i16 (p0 >> 1): expected -1 (0xffffffffffffffff), got 0xfffe"]
    assert prog.mismatches("2\n") and not prog.mismatches("2\nffffffffffffffff\ndone\n")


def test_a_generated_kernel_names_what_it_is():
    prog = gen_exprs.program(3, 30)
    assert "seed 3" in prog.text and "fn kmain() -> u64" in prog.text
    assert prog.expected_output().count("\n") == 31
