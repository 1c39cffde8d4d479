"""The cost model (pvtool/tools/costmodel.py, bench/costs.toml) and `pvtool bench --cost-model/--cost-file`."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from bench_fakes import fake_kernels, fake_result

from pvtool import cli, driver
from pvtool.tools import bench, costmodel
from runtime.hypervisor import run

ROOT = Path(__file__).resolve().parents[1]
HELLO = str(ROOT / "kernels" / "hello.pvk")

CUSTOM = """
default = "flat"
[sources.mine]
cite = "a measurement of my own"
[models.flat]
cpu = "a 1 GHz test CPU"
ghz = 1.0
exit = { cycles = 1000, basis = "published", source = "mine" }
[models.flat.kinds]
"hypercall" = { cycles = 250, basis = "published", source = "mine" }
"batched entry" = { cycles = 10, basis = "estimate", source = "mine", derived = "a guess, for the test" }
"""


def custom_table(tmp_path: Path, text: str = CUSTOM, name: str = "costs.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the shipped models ----------------------------------------------------------------------

def test_shipped_models_load_and_cite_their_sources():
    table = costmodel.load()
    assert table.default in table.models and {"nehalem", "penryn", "merom"} <= set(table.models)
    for model in table.models.values():
        for cost in [model.exit, *model.kinds.values()]:
            if cost.basis != "not modelled":
                assert table.sources[cost.source]["cite"]
    nehalem = table.models["nehalem"]
    assert (nehalem.exit.cycles, nehalem.exit.basis, nehalem.ghz) == (2000, "published", 2.93)


def test_estimates_follow_the_stated_reductions():
    # idf2008: Nehalem about 33% below Penryn, Penryn about 40% below Merom
    models = costmodel.load().models
    assert models["penryn"].exit.cycles == round(models["nehalem"].exit.cycles / (1 - 0.33))
    assert models["merom"].exit.cycles == round(models["penryn"].exit.cycles / (1 - 0.40))
    assert all(models[m].exit.basis == "estimate" for m in ("penryn", "merom"))


# -- the table of reasons --------------------------------------------------------------------

@pytest.mark.parametrize("mode, reason, kind", [
    ("pv", "hypercall multicall", "hypercall"), ("pv", "upcall 32", "upcall"),
    ("trap", "trap cli", "trapped instruction"), ("trap", "trap mov to cr3", "trapped instruction"),
    ("trap", "interrupt 32", "interrupt"), ("trap", "interrupt window", "interrupt window"),
    ("trap", "page-table write", "page-table write"), ("pv", "table page released", "page-table write"),
    ("trap", "write beside a page table", "page-table write"),
    ("bare", "port I/O out", "native"), ("bare", "interrupt 32", "native"), ("bare", "cpuid", "native"),
    ("hvm", "I/O instruction", "trapped instruction"), ("hvm", "HLT", "trapped instruction"),
    ("hvm", "external interrupt 32", "interrupt"), ("hvm", "interrupt window", "interrupt window"),
    ("hvm-shadow", "CR3 load", "trapped instruction"), ("hvm-shadow", "INVLPG", "trapped instruction"),
    ("hvm-shadow", "page-table write (shadow)", "page-table write"), ("hvm-shadow", "exception 14", "exception"),
    ("trap", "system call", "system call"), ("pv", "exception 13", "exception"),
    ("trap", "something new", "exit"), ("pv", "CPUID", "exit"),
])
def test_reason_kinds(mode, reason, kind):
    assert costmodel.kind_of(mode, reason) == kind


@pytest.mark.parametrize("kernel", ["mm", "tasks", "churn", "machine"])
def test_every_reason_a_kernel_exits_for_has_a_kind(kernel):
    source = str(ROOT / "kernels" / f"{kernel}.pvk")
    for mode in ("trap", "pv", "hvm", "hvm-shadow"):
        result = run(driver.compile_file(source, bench.TARGET_OF[mode]), mode, timeout=60)
        assert result.reason == "shutdown", result.message
        unnamed = [why for why in result.stats.exits if costmodel.kind_of(mode, why) == "exit"]
        assert unnamed == [], f"{kernel} {mode}: add these reasons to REASON_KINDS"


# -- the arithmetic ------------------------------------------------------------------------------

def test_overhead_is_exits_times_their_kinds_cost(tmp_path):
    model = costmodel.load(custom_table(tmp_path)).choose(None)
    pv = model.overhead_ns("pv", Counter({"hypercall multicall": 3, "upcall 32": 2}), Counter({"set_pte": 64}))
    assert pv == 3 * 250 + 2 * 1000 + 64 * 10
    assert model.overhead_ns("trap", {"trap cli": 5, "interrupt 32": 1}) == 6000
    assert model.overhead_ns("bare", {"port I/O out": 500, "interrupt 32": 9}) == 0


def test_rows_carry_the_modelled_overhead(tmp_path):
    model = costmodel.load(custom_table(tmp_path)).choose("flat")
    exits = {"bare": {"port I/O out": 7}, "trap": {"trap cli": 4}, "pv": {"hypercall multicall": 4}}

    rows = bench.measure(fake_kernels("k"), ["bare", "trap", "pv"], 1, model=model,
                         runner=lambda image, mode, t: fake_result(mode, exits=exits[mode]))
    assert [(r.cost_model, r.modelled_ns) for r in rows] == [("flat", 0), ("flat", 4000), ("flat", 1000)]
    assert "modelled ms" in bench.table(rows, model) and "modelled" not in bench.table(rows, None)


# -- through the command --------------------------------------------------------------------------

def test_modelled_column_is_labelled(capsys):
    assert cli.main(["bench", HELLO, "--repeat", "1", "--cost-model", "merom"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[-2:] == ["modelled", "ms"]
    assert "cost model merom: Intel Core 2 Duo E6600" in out and "estimate" in out


def test_cost_file_replaces_the_shipped_models(capsys, tmp_path):
    path = custom_table(tmp_path)
    assert cli.main(["bench", HELLO, "--repeat", "1", "--modes", "trap", "--json", "--cost-file", str(path)]) == 0
    row, = json.loads(capsys.readouterr().out)
    assert row["cost_model"] == "flat"
    assert row["modelled_ns"] == pytest.approx(1000.0 * row["exits"])       # trap: every exit at 1,000 ns


def test_json_cost_file(capsys, tmp_path):
    doc = {"sources": {"s": {"cite": "x"}},
           "models": {"one": {"ghz": 2, "exit": {"cycles": 4000, "basis": "published", "source": "s"}}}}
    path = custom_table(tmp_path, json.dumps(doc), "costs.json")
    assert cli.main(["bench", HELLO, "--repeat", "1", "--modes", "pv", "--json", "--cost-file", str(path)]) == 0
    row, = json.loads(capsys.readouterr().out)
    assert row["modelled_ns"] == pytest.approx(2000.0 * row["exits"])


@pytest.mark.parametrize("text, message", [
    ("models = 3", "no [models.NAME] table"),
    ("[models.a]\nexit = { cycles = 1, basis = 'not modelled' }", "model 'a': ghz must be a positive number"),
    ("[models.a]\nghz = 1", "model 'a': no exit cost"),
    ("[models.a]\nghz = 1\nexit = { cycles = 1, basis = 'published' }", "exit: a published figure needs a source"),
    ("[models.a]\nghz = 1\nexit = { cycles = -1, basis = 'not modelled' }", "exit: cycles must be a number"),
    ("[models.a]\nghz = 1\nexit = { cycles = 1, basis = 'guess' }", "exit: basis must be one of"),
    ("[sources.s]\ncite='x'\n[models.a]\nghz = 1\nexit = { cycles = 1, basis = 'estimate', source = 's' }",
     "an estimate must say how it was derived"),
    ("[models.a]\nghz = 1\nexit = { cycles = 1, basis = 'not modelled' }\n[models.a.kinds]\nhypercal = 3",
     "unknown exit kind 'hypercal'"),
    ("default = 'b'\n[models.a]\nghz = 1\nexit = { cycles = 1, basis = 'not modelled' }",
     "default model 'b' is not defined"),
    ("[models.a\nghz = 1", "not valid TOML: "),
])
def test_bad_cost_files_are_one_line_errors(capsys, tmp_path, text, message):
    path = custom_table(tmp_path, text)
    assert cli.main(["bench", HELLO, "--cost-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pvtool bench: {path}: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_cost_file_and_unknown_model(capsys, tmp_path):
    assert cli.main(["bench", HELLO, "--cost-file", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: cannot read: No such file or directory" in capsys.readouterr().err
    assert cli.main(["bench", HELLO, "--cost-model", "pentium"]) == 2
    assert "no cost model 'pentium' (models: nehalem, penryn, merom)" in capsys.readouterr().err
