"""benchmarks/regression.py on synthetic pytest-benchmark JSON."""
import importlib.util
import json
import os

import pytest

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "regression.py")
_spec = importlib.util.spec_from_file_location("bench_regression", _path)
regression = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regression)

COMPACT = "benchmarks/test_bench_kernels.py::test_bench_compact_30_layers[1024]"
DECODE = "benchmarks/test_bench_decode.py::test_bench_decode[h2o]"


def bench_run(**ratios):
    """A --benchmark-json document; ratios: fullname-less shorthands compact=..., decode=..."""
    benchmarks = [{"fullname": COMPACT, "extra_info": {"device": "cpu", "n": 1024,
                                                       "fraction_of_copy_bandwidth": ratios.get("compact", 0.4)}},
                  {"fullname": DECODE, "extra_info": {"decode_time_ratio": ratios.get("decode", 0.8),
                                                      "ok": True}}]
    return {"machine_info": {"machine": "x86_64", "cpu": {"brand_raw": "test CPU"}}, "benchmarks": benchmarks}


@pytest.fixture
def baseline():
    return regression.updated(bench_run(), {})


def test_update_keeps_only_ratios_with_a_direction(baseline):
    assert baseline["benchmarks"] == {
        COMPACT: {"fraction_of_copy_bandwidth": {"better": "higher", "value": 0.4}},
        DECODE: {"decode_time_ratio": {"better": "lower", "value": 0.8}}}


def test_within_tolerance_passes(baseline):
    failures, notes = regression.check(bench_run(compact=0.3, decode=1.1), baseline)
    assert failures == [] and notes == []


def test_improvements_pass(baseline):
    assert regression.check(bench_run(compact=0.9, decode=0.2), baseline)[0] == []


def test_regression_names_the_benchmark(baseline):
    failures, _ = regression.check(bench_run(compact=0.1), baseline)
    assert len(failures) == 1
    assert COMPACT in failures[0] and "fraction_of_copy_bandwidth" in failures[0] and "4.00x worse" in failures[0]
    failures, _ = regression.check(bench_run(decode=2.0), baseline)
    assert len(failures) == 1 and DECODE in failures[0]


def test_per_entry_tolerance_and_two_sided(baseline):
    baseline["benchmarks"][COMPACT]["fraction_of_copy_bandwidth"].update(tolerance=0.1, better="either")
    assert regression.check(bench_run(compact=0.5), baseline)[0]   # 1.25x higher: outside +-10%
    assert not regression.check(bench_run(compact=0.42), baseline)[0]


def test_missing_measurements_and_new_ratios_are_notes(baseline):
    run = bench_run()
    run["benchmarks"] = run["benchmarks"][:1]
    run["benchmarks"][0]["extra_info"]["prefill_speedup"] = 2.0
    failures, notes = regression.check(run, baseline)
    assert failures == []
    assert any("not measured" in n and DECODE in n for n in notes)
    assert any("no baseline" in n and "prefill_speedup" in n for n in notes)


def test_update_keeps_directions_and_tolerances(baseline):
    baseline["benchmarks"][DECODE]["decode_time_ratio"]["tolerance"] = 0.2
    new = regression.updated(bench_run(decode=0.5), baseline)
    assert new["benchmarks"][DECODE]["decode_time_ratio"] == {"better": "lower", "tolerance": 0.2, "value": 0.5}


def test_overheads_compare_as_one_plus():
    prefill = "benchmarks/test_bench_prefill.py::test_bench_prefill_overhead[1024-h2o]"
    run = {"benchmarks": [{"fullname": prefill, "extra_info": {"overhead": 0.02, "policy_prefill_s": 3.1}}]}
    baseline = regression.updated(run, {})
    assert baseline["benchmarks"][prefill] == {"overhead": {"better": "lower", "value": 0.02}}
    run["benchmarks"][0]["extra_info"]["overhead"] = 0.3   # 1.3 / 1.02: noise, not 15x worse
    assert regression.check(run, baseline)[0] == []
    run["benchmarks"][0]["extra_info"]["overhead"] = 1.5   # 2.5 / 1.02
    assert prefill in regression.check(run, baseline)[0][0]


def test_command_line(tmp_path, baseline, capsys):
    run_path, base_path = tmp_path / "run.json", tmp_path / "baseline.json"
    run_path.write_text(json.dumps(bench_run()))
    assert regression.main([str(run_path), "--baseline", str(base_path), "--update"]) == 0
    assert regression.main([str(run_path), "--baseline", str(base_path)]) == 0
    run_path.write_text(json.dumps(bench_run(decode=5.0)))
    assert regression.main([str(run_path), "--baseline", str(base_path)]) == 1
    assert "REGRESSION" in capsys.readouterr().err
