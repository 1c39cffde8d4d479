"""Test support: the kernels the suite runs, and what each header says it must do.

A kernel's header has `// expect-exit: N` and, in order, `// | LINE` for each
console line.  Project kernels live in kernels/, the shared conformance
kernels in ../shared/conformance/ (beside the repository, optional).
"""
from __future__ import annotations

from pathlib import Path

from pvtool.expect import Expectation, expectation  # noqa: F401  (re-exported for tests)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONFORMANCE = SHARED / "conformance"
PROJECT_KERNELS = ROOT / "kernels"


def kernels_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.pvk") if "expect-exit:" in p.read_text())


def conformance_kernels() -> list[Path]:
    return kernels_in(CONFORMANCE)


def project_kernels() -> list[Path]:
    return kernels_in(PROJECT_KERNELS)


def all_kernels() -> list[Path]:
    return project_kernels() + conformance_kernels()


def kernel_id(path: Path) -> str:
    return ("shared/" if CONFORMANCE in path.parents else "") + path.stem
