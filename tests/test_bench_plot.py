"""`pvtool bench --plot`: the picture's structure (SVG) and pixels (PNG), and the refusals."""
from __future__ import annotations

import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from bench_fakes import fake_kernels, fake_result

from pvtool import cli
from pvtool.tools import bench, benchplot

ROOT = Path(__file__).resolve().parents[1]
HELLO = str(ROOT / "kernels" / "hello.pvk")
needs_matplotlib = pytest.mark.skipif(not benchplot.available(), reason="matplotlib is not installed")

EXITS = {
    "bare": {"port I/O out": 40, "port I/O in": 30},
    "trap": {"trap cli": 900, "trap pushfq": 800, "trap popfq": 700, "trap out": 40, "trap in": 30,
             "page-table write": 20, "interrupt 32": 5, "trap lidt": 1},
    "pv": {"hypercall multicall": 60, "hypercall io_in": 30, "upcall 32": 5, "hypercall set_trap_table": 1},
}


def fake_rows(*kernels: str) -> list[bench.Row]:
    return bench.measure(fake_kernels(*kernels), ["bare", "trap", "pv"], 1, runner=lambda image, mode, t: fake_result(
        mode, exits=EXITS[mode], wall=1.5, load=1.0, run=0.4, hypervisor=0.1))


def bar_ids(svg: Path) -> list[str]:
    return [g.get("id") for g in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}g")
            if g.get("id", "").startswith(("exits:", "time:"))]


def texts(svg: Path) -> list[str]:
    return [t.text or "" for t in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}text")]


def test_segments_keep_the_top_reasons_and_sum_the_rest():
    rows = fake_rows("k")
    drawn = benchplot.reasons_drawn(rows)
    assert drawn == ["trap cli", "trap pushfq", "trap popfq", "hypercall multicall", "port I/O out", "trap out"]
    trap = benchplot.segments(rows[1], drawn)
    assert trap[-1] == ("other", 30 + 20 + 5 + 1) and sum(n for _, n in trap) == rows[1].exits
    assert benchplot.segments(rows[0], drawn)[-1] == ("other", 30)


@needs_matplotlib
def test_svg_has_one_bar_per_reason_and_time_part(tmp_path):
    rows = fake_rows("alpha", "beta")
    svg = tmp_path / "bench.svg"
    benchplot.plot(rows, svg)
    ids = bar_ids(svg)
    expected = [f"exits:{r.kernel}:{r.mode}:{why}" for r in rows
                for why, n in benchplot.segments(r, benchplot.reasons_drawn(rows)) if n]
    expected += [f"time:{r.kernel}:{r.mode}:{part}" for r in rows for part in benchplot.TIME_PARTS]
    assert sorted(ids) == sorted(expected)
    assert len([i for i in ids if i.startswith("exits:alpha:trap:")]) == 5   # its 4 drawn reasons and "other"
    words = " ".join(texts(svg))
    for label in ("alpha: exits by reason", "beta: guest and hypervisor time", "bare", "trap", "pv",
                  "trap cli", "hypercall multicall", "other", " 2,496", " load 1000 ms"):
        assert label in words


@needs_matplotlib
def test_png_is_a_picture_of_the_right_size(tmp_path):
    from matplotlib.image import imread
    png = tmp_path / "bench.png"
    benchplot.plot(fake_rows("k"), png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1400, 320)                      # figsize (14, 1.2 + 2.0) at 100 dpi
    pixels = imread(png)
    assert pixels.std() > 0.05 and (pixels[..., :3] < 0.5).mean() > 0.01   # not blank: bars and text


@needs_matplotlib
def test_plot_through_the_command(capsys, tmp_path):
    svg = tmp_path / "hello.svg"
    assert cli.main(["bench", HELLO, "--repeat", "1", "--plot", str(svg)]) == 0
    assert capsys.readouterr().out.startswith("kernel")
    ids = bar_ids(svg)
    assert {i.rsplit(":", 1)[0] for i in ids if i.startswith("time:")} == {f"time:hello:{m}" for m in bench.MODES}
    assert any(i.startswith("exits:hello:pv:hypercall ") for i in ids)


@needs_matplotlib
def test_unwritable_plot_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_default_runner", lambda image, mode, t: fake_result(mode, exits=EXITS[mode]))
    assert cli.main(["bench", HELLO, "--repeat", "1", "--modes", "bare,trap,pv",
                     "--plot", str(tmp_path / "no" / "such.svg")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pvtool bench: cannot write ") and err.count("\n") == 1


def test_without_matplotlib_plot_is_refused_before_running(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib now fails
    monkeypatch.setattr(bench, "build", lambda *a: pytest.fail("built a kernel although --plot cannot work"))
    assert cli.main(["bench", HELLO, "--plot", str(tmp_path / "b.svg")]) == 2
    err = capsys.readouterr().err
    assert err == ("pvtool bench: --plot needs matplotlib, which is not installed: "
                   "pip install 'pvtool[plot]' (or: pip install matplotlib)\n")
    assert not (tmp_path / "b.svg").exists()


@pytest.mark.parametrize("name", ["b.pdf", "b", "b.svg.txt"])
def test_plot_needs_svg_or_png(capsys, name):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", HELLO, "--plot", name])
    assert e.value.code == 2
    assert "argument --plot: " + name + ": the picture's name must end in .svg or .png" in capsys.readouterr().err
