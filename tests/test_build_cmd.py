"""`pvtool build` and the command line around it (pvtool/cli.py, pvtool/commands/build.py)."""
from __future__ import annotations

import pytest

from pvimage import elfread as elfinfo
from pvtool.cli import COMMANDS, main

KERNEL = "fn kmain() -> u64 { cli(); outb(0x80, 1); return 5; }\n"


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "k.pvk"
    path.write_text(KERNEL)
    return path


def test_pv_is_the_default_target_and_names_the_output(source):
    assert main(["build", str(source)]) == 0
    image = elfinfo.load((source.parent / "k.pv.elf").read_bytes())
    assert image.mode == "pv" and image.hypercall_page is not None


def test_native_target_and_explicit_output(source, tmp_path):
    out = tmp_path / "out" / "native.elf"
    out.parent.mkdir()
    assert main(["build", str(source), "--target", "native", "-o", str(out)]) == 0
    image = elfinfo.load(out.read_bytes())
    assert image.mode == "native" and image.pvh_entry is not None


def test_emit_ir_shows_the_rewrite_for_pv_only(source, capsys):
    assert main(["build", str(source), "--target", "native", "--emit-ir"]) == 0
    native = capsys.readouterr().out
    assert "MachineOp" in native and "op='cli'" in native and "Hypercall" not in native
    assert main(["build", str(source), "--emit-ir"]) == 0
    pv = capsys.readouterr().out
    assert "SiteBegin" in pv and "Hypercall" in pv and "MachineOp" not in pv


def test_an_unwritable_output_is_one_line(source, tmp_path, capsys):
    assert main(["build", str(source), "-o", str(tmp_path / "no" / "such" / "dir.elf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pvtool build: cannot write")


def test_every_command_is_registered(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"    {name}" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: pvtool" in capsys.readouterr().out
