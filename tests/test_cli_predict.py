"""`moe-trace synth`, `phases` and `predict` end to end, and their handling of bad input (exit 2, one line)."""

import json
import subprocess
import sys

import pytest

from moe_trace.cli import main

PROTOCOL = ["--horizons", "200", "400", "--stride", "200", "--min-history", "400"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "trace"
    assert main(["synth", str(out), "--layers", "2", "--experts", "6", "--steps", "2400", "--tokens-per-step",
                 "2048", "--seq-len", "256", "--switch-step", "1000", "--seed", "3"]) == 0
    return out


def test_phases_json_finds_the_switch(synthetic, tmp_path):
    assert main(["phases", str(synthetic), "--json", str(tmp_path / "p.json")]) == 0
    records = json.loads((tmp_path / "p.json").read_text())
    assert [r["layer"] for r in records] == [0, 1]
    assert all(abs(r["stable_from"] - 1000) <= 300 for r in records)


def test_predict_prints_the_table_and_writes_the_records(synthetic, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["predict", str(synthetic), "--predictors", "sw_avg:window=100,ema,auto", *PROTOCOL,
                 "--per-layer", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "step_floor" in table and "sw_avg:window=100" in table
    records = json.loads(out.read_text())
    keys = {"predictor", "horizon", "phase", "layer", "step_wape", "step_floor", "mean_wape", "n_origins"}
    assert all(set(r) == keys for r in records)
    assert {(r["predictor"], r["horizon"]) for r in records} == {
        (p, h) for p in ("sw_avg:window=100", "ema", "auto") for h in (200, 400)}
    assert {r["phase"] for r in records} == {"all", "transient", "stable"}
    assert {r["layer"] for r in records} == {"all", 0, 1}


@pytest.mark.parametrize(("args", "message"), [
    (["predict", "{missing}"], "no trace at"),
    (["predict", "{trace}", "--horizons", "5000"], "too few for a 5000-step horizon"),
    (["predict", "{trace}", "--predictors", "sw_avg,crystal_ball", *PROTOCOL], "unknown predictor 'crystal_ball'"),
    (["predict", "{trace}", "--predictors", "sw_avg:window=0", *PROTOCOL], "window must be >= 1"),
    (["phases", "{missing}"], "no trace at"),
    (["synth", "{trace}"], "already exists"),
])
def test_bad_input_is_one_line_and_exit_2(synthetic, tmp_path, args, message):
    argv = [a.format(trace=synthetic, missing=tmp_path / "nope") for a in args]
    run = subprocess.run([sys.executable, "-m", "moe_trace", *argv], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
