"""What the README, docs/ and every `--help` show works from a fresh clone with nothing beside it.

Every repository path they mention must exist in the clone, and none may
reach outside it (`../`): a checkout beside the clone is an optional extra
check, never something a reader needs.  The shell line the README gives for
QEMU's exit code is run on the codes QEMU produces.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pvtool import cli

ROOT = Path(__file__).resolve().parents[1]
TOP = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))
# a path: anything that climbs out with ../, a top-level folder of the clone and a name, or any
# relative path to a file (folders and a name with a suffix: spec/pvk-language.md)
MENTION = re.compile(r"(?<![\w./:-])((?:\.\./)+[\w./*-]*|(?:%s)/[\w./*-]*[\w*]|[\w-]+(?:/[\w*-]+)*/[\w*-]+\.[a-z]+\b)"
                     % "|".join(map(re.escape, TOP)))
BUILD_OUTPUTS = (".elf",)
EXAMPLES = {"lib/serial.pvk", "dir/lib/x.pvk"}     # docs/language.md: an import and an error message
# where a path written relative to its folder (lib/irq.pvk in kernels/, x86/isel.py in pvtool/) lives
BASES = [ROOT] + [ROOT / top for top in TOP]


def documents() -> dict[str, str]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    docs = {str(p.relative_to(ROOT)): p.read_text() for p in files}
    parser = cli.build_parser()
    docs["pvtool --help"] = parser.format_help()
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            docs[f"pvtool {name} --help"] = sub.format_help()
    return docs


def mentions(text: str) -> list[str]:
    return [m.group(1) for m in MENTION.finditer(text)]


def test_the_pattern_finds_what_it_must():
    text = ("see `kernels/churn.pvk`, ../shared/conformance/oschurn.pvk, bench/c/*.c and spec/pvk-language.md; "
            "kernel.pvk is a placeholder, pushf/cli/popf and I/O are words, https://example.org/a/b.html a link")
    assert mentions(text) == ["kernels/churn.pvk", "../shared/conformance/oschurn.pvk", "bench/c/*.c",
                              "spec/pvk-language.md"]


@pytest.mark.parametrize("where", sorted(documents()))
def test_every_path_shown_is_in_the_clone(where):
    text = documents()[where]
    outside = [m for m in mentions(text) if m.startswith("../")]
    assert outside == [], f"{where} points outside the clone"
    missing = [m for m in mentions(text) if not m.endswith(BUILD_OUTPUTS) and m not in EXAMPLES and not in_clone(m)]
    assert missing == [], f"{where} points at files a clone does not have"


def in_clone(path: str) -> bool:
    return any(list(base.glob(path)) if "*" in path else (base / path).exists() for base in BASES)


def qemu_line() -> str:
    readme = (ROOT / "README.md").read_text()
    line, = [ln for ln in readme.splitlines() if ln.startswith("rc=$?;")]
    return line


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("qemu_exit, says", [(1, "guest status 0"), (11, "guest status 5"), (255, "guest status 127"),
                                             (0, "no debug-exit: triple fault or reset")])
def test_readme_turns_qemus_exit_code_back(qemu_exit, says):
    out = subprocess.run(["bash", "-c", f"(exit {qemu_exit}); {qemu_line()}"], capture_output=True, text=True)
    assert out.stdout.strip() == says
    assert qemu_line() in (ROOT / "docs" / "language.md").read_text()
