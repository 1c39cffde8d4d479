"""`pvtool build` and the command line around it (pvtool/cli.py, pvtool/commands/build.py)."""
from __future__ import annotations

import pytest

from pvimage import elfread as elfinfo
from pvtool.cli import main

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


def test_emit_ir_is_a_listing_that_shows_the_rewrite_for_pv_only(source, capsys):
    assert main(["build", str(source), "--target", "native", "--emit-ir"]) == 0
    native = capsys.readouterr().out
    lines = native.splitlines()
    assert lines[0] == f"; native module of {source}"
    start = next(n for n, line in enumerate(lines) if line.startswith("fn kmain() -> value"))
    assert lines[start].endswith(f" ; {source}:1")
    assert lines[start + 1:start + 5] == ["  entry:", f"    machine cli()                       ; {source}:1",
                                          "    machine outb(128, 1)", "    ret 5"]
    assert "hypercall" not in native
    assert main(["build", str(source), "--emit-ir"]) == 0
    pv = capsys.readouterr().out
    assert "site 0 begin, no-exit: cli" in pv and "hypercall multicall()" in pv and "machine" not in pv
    for listing in (native, pv):
        assert not any(word in listing for word in ("Loc(", "VReg", "dst=", "MachineOp"))


def test_a_compile_error_quotes_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.pvk"
    bad.write_text("fn kmain() -> u64 {\n    return nothing;\n}\n")
    assert main(["build", str(bad)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{bad}:2:12: error: unknown name 'nothing'", "    return nothing;", "           ^"]
    assert not (tmp_path / "bad.pv.elf").exists()


def test_an_unwritable_output_is_one_line(source, tmp_path, capsys):
    assert main(["build", str(source), "-o", str(tmp_path / "no" / "such" / "dir.elf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pvtool build: cannot write")


def test_every_command_is_registered(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("build", "check", "diff", "run", "bench"):
        assert f"    {name}" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: pvtool" in capsys.readouterr().out


# -- internal errors: one line, exit status 70 ----------------------------------------------------

def test_an_internal_error_is_one_line_with_status_70(source, monkeypatch, capsys):
    from pvtool import typecheck
    monkeypatch.setattr(typecheck, "check", lambda program: program)   # lower then meets an unchecked tree
    assert main(["build", str(source)]) == 70
    assert capsys.readouterr().err.splitlines() == [
        "pvtool: internal error in lower: the program has not been type-checked "
        "(please report this, with the input)"]


def test_an_unexpected_exception_names_the_command(source, monkeypatch, capsys):
    from pvtool.x86 import codegen

    def broken(module):
        raise KeyError("vreg 7")
    monkeypatch.setattr(codegen, "generate", broken)
    assert main(["build", str(source)]) == 70
    assert capsys.readouterr().err.splitlines() == [
        "pvtool: internal error in build: KeyError: 'vreg 7' (please report this, with the input)"]


def test_pvtool_debug_shows_the_traceback(source, monkeypatch):
    from pvtool.x86 import codegen

    def broken(module):
        raise KeyError("vreg 7")
    monkeypatch.setattr(codegen, "generate", broken)
    monkeypatch.setenv("PVTOOL_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["build", str(source)])


def test_a_command_that_fails_to_import_is_an_internal_error(monkeypatch, capsys):
    import sys
    import pvtool.commands
    monkeypatch.delattr(pvtool.commands, "diff")
    monkeypatch.setitem(sys.modules, "pvtool.commands.diff", None)       # the import fails
    assert main(["build", "--help"]) == 70
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("pvtool: internal error in pvtool: ModuleNotFoundError: ")
    assert "pvtool.commands.diff" in err[0]


def test_help_documents_status_70(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "70 internal error" in capsys.readouterr().out
