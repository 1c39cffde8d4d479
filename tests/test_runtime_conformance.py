"""The conformance kernels on the bundled hypervisor, built by pvtool: pv, bare and trap.

Each kernel's header lists its console lines (`// | ...`) and exit status
(`// expect-exit: N`); every mode must produce exactly those.  Skips when
/work/shared is absent, and per kernel while the compiler cannot build it.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

from runtime.hypervisor import run

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFORMANCE = SHARED / "conformance"
KERNELS = sorted(p.stem for p in CONFORMANCE.glob("*.pvk")) if CONFORMANCE.is_dir() else []
SLOW = {"oschurn"}

pytestmark = pytest.mark.skipif(not KERNELS, reason=f"conformance kernels not found under {CONFORMANCE}")


def expected(path: Path) -> tuple[bytes, int]:
    text = path.read_text()
    lines = [m + "\n" for m in re.findall(r"^// \| (.*)$", text, re.M)]
    status = int(re.search(r"^// expect-exit: (\d+)", text, re.M).group(1))
    return "".join(lines).encode(), status


@lru_cache(maxsize=None)
def image(name: str, target: str) -> bytes:
    from pvtool import driver
    return driver.compile_file(str(CONFORMANCE / f"{name}.pvk"), target)


def params():
    for name in KERNELS:
        for mode in ("pv", "bare", "trap"):
            marks = [pytest.mark.slow] if name in SLOW else []
            yield pytest.param(name, mode, marks=marks, id=f"{name}-{mode}")


@pytest.mark.parametrize("name,mode", params())
def test_conformance_kernel(name, mode):
    try:
        data = image(name, "pv" if mode == "pv" else "native")
    except Exception as e:      # the compiler is another stage; its failures are not the runtime's
        pytest.skip(f"pvtool cannot build {name}.pvk yet: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    console, status = expected(CONFORMANCE / f"{name}.pvk")
    result = run(data, mode=mode, timeout=300)
    assert result.message == "" and result.reason == "shutdown", result.message
    assert result.console.decode() == console.decode()
    assert result.status == status
