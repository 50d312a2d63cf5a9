"""Bad input to every subcommand: exit status 2, one line on stderr, no traceback, nothing left behind.

Each case runs the command line's ``main`` in this process (the console script adds nothing but process
start-up; ``test_the_console_script_reports_bad_input_the_same_way`` checks it once). A case passes when
the command exits 2 with exactly one line on stderr naming the problem, and the scratch directory it may
write into (``{out}``) holds nothing afterwards: a retry with corrected input is never blocked by what a
failed attempt left.
"""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_trace import synth, trace
from moe_trace.cli import main

TINY = ["--model", "gpt-tiny-moe", "--device", "cpu"]

# (argv, a fragment the one line must contain). {trace}: a valid 1200-step trace; {short}: a valid 60-step
# one; {missing}, {empty_dir}, {empty_file}, {damaged}, {foreign}, {text}: what their names say; {out}: a
# scratch path the command may create (it must leave nothing there).
CASES = [
    # phases
    (["phases", "{missing}"], "no trace at"),
    (["phases", "{empty_dir}"], "holds no"),
    (["phases", "{empty_file}"], "not a readable Parquet file"),
    (["phases", "{damaged}"], "not a readable Parquet file"),
    (["phases", "{foreign}"], "not a moe-trace trace"),
    (["phases", "{text}"], "not a readable Parquet file"),
    (["phases", "{trace}", "--block", "0"], "--block"),
    (["phases", "{trace}", "--lag", "-1"], "--lag"),
    (["phases", "{trace}", "--block", "ten"], "invalid int value"),
    (["phases", "{trace}", "--threshold", "-1"], "--threshold"),
    (["phases", "{trace}", "--penalty", "nan"], "--penalty"),
    (["phases", "{trace}", "--json", "{text}/out.json"], "--json"),
    # predict
    (["predict", "{missing}"], "no trace at"),
    (["predict", "{foreign}"], "not a moe-trace trace"),
    (["predict", "{trace}", "--predictors", "crystal_ball"], "unknown predictor 'crystal_ball'"),
    (["predict", "{trace}", "--predictors", ","], "--predictors is empty"),
    (["predict", "{trace}", "--predictors", "sw_avg:window=0"], "window must be >= 1"),
    (["predict", "{trace}", "--predictors", "sw_avg:colour=red"], "bad parameters for predictor 'sw_avg'"),
    (["predict", "{trace}", "--predictors", "sw_avg:window"], "bad predictor spec"),
    (["predict", "{trace}", "--predictors", "arima:order=(1,2)"], "order"),
    (["predict", "{trace}", "--horizons", "0"], "--horizons"),
    (["predict", "{trace}", "--horizons", "-100"], "--horizons"),
    (["predict", "{trace}", "--horizons", "1.5"], "invalid int value"),
    (["predict", "{trace}", "--stride", "0"], "--stride"),
    (["predict", "{trace}", "--min-history", "-5"], "--min-history"),
    (["predict", "{trace}", "--horizons", "5000"], "too few for a 5000-step horizon"),
    (["predict", "{short}", "--horizons", "100", "--min-history", "100"], "too few"),
    (["predict", "{trace}", "--workers", "-1"], "--workers"),
    # simulate
    (["simulate", "{trace}"], "--gpus"),
    (["simulate", "{trace}", "--gpus", "0"], "gpus"),
    (["simulate", "{trace}", "--gpus", "-4"], "gpus"),
    (["simulate", "{trace}", "--gpus", "4", "--redundant", "-1"], "redundant"),
    (["simulate", "{trace}", "--gpus", "100000000"], "GPUs"),
    (["simulate", "{trace}", "--gpus", "100000000", "--redundant", "99999992"], "more than this machine's"),
    (["simulate", "{trace}", "--gpus", "4", "--policy", "teleport"], "unknown policy"),
    (["simulate", "{trace}", "--gpus", "4", "--policy", ""], "unknown policy"),
    (["simulate", "{trace}", "--gpus", "4", "--replan-every", "0"], "--replan-every"),
    (["simulate", "{trace}", "--gpus", "4", "--predictor", "crystal_ball"], "unknown predictor"),
    (["simulate", "{trace}", "--gpus", "4", "--matmul-tflops", "0"], "must be > 0"),
    (["simulate", "{trace}", "--gpus", "4", "--planner", "random"], "invalid choice"),
    (["simulate", "{damaged}", "--gpus", "4"], "not a readable Parquet file"),
    # place
    (["place", "{trace}", "--gpus", "4"], "--at"),
    (["place", "{trace}", "--gpus", "4", "--at", "-1"], "--at"),
    (["place", "{trace}", "--gpus", "4", "--at", "0"], "--at"),
    (["place", "{trace}", "--gpus", "4", "--at", "1000000000"], "--at"),
    (["place", "{trace}", "--gpus", "4", "--at", "500", "--window", "0"], "--window"),
    (["place", "{trace}", "--gpus", "0", "--at", "500"], "gpus"),
    (["place", "{empty_file}", "--gpus", "4", "--at", "500"], "not a readable Parquet file"),
    # report
    (["report", "{trace}"], "--out"),
    (["report", "{missing}", "--out", "{out}"], "no trace at"),
    (["report", "{trace}", "--out", "{text}"], "--out"),
    (["report", "{trace}", "--out", "{out}", "--window", "1"], "window"),
    (["report", "{trace}", "--out", "{out}", "--gpus", "0"], "gpus"),
    (["report", "{trace}", "--out", "{out}", "--predictors", "crystal_ball"], "unknown predictor"),
    (["report", "{trace}", "--out", "{out}", "--horizons", "0"], "--horizons"),
    (["report", "{trace}", "--out", "{out}", "--horizons", "5000"], "too few for a 5000-step horizon"),
    (["report", "{trace}", "--out", "{out}", "--policy", "teleport"], "unknown policy"),
    # synth
    (["synth", "{out}", "--steps", "0"], "steps"),
    (["synth", "{out}", "--experts", "0"], "experts"),
    (["synth", "{out}", "--experts", "4", "--top-k", "5"], "top_k"),
    (["synth", "{out}", "--tokens-per-step", "-1"], "tokens_per_step"),
    (["synth", "{trace}"], "already exists"),
    # train
    (["train", "--out", "{out}"], "--model is required"),
    (["train", "--out", "{out}", "--model", "gpt-huge"], "unknown model"),
    (["train", "--out", "{out}", *TINY, "--steps", "0"], "--steps"),
    (["train", "--out", "{out}", *TINY, "--steps", "-3"], "--steps"),
    (["train", "--out", "{out}", *TINY, "--steps", "many"], "invalid int value"),
    (["train", "--out", "{out}", *TINY, "--global-batch", "0"], "--global-batch"),
    (["train", "--out", "{out}", *TINY, "--micro-batch", "0"], "--micro-batch"),
    (["train", "--out", "{out}", *TINY, "--micro-batch", "3"], "does not divide"),
    (["train", "--out", "{out}", *TINY, "--lr", "-0.001"], "--lr"),
    (["train", "--out", "{out}", *TINY, "--lr", "nan"], "--lr"),
    (["train", "--out", "{out}", *TINY, "--warmup", "-1"], "--warmup"),
    (["train", "--out", "{out}", *TINY, "--eval-every", "0"], "--eval-every"),
    (["train", "--out", "{out}", *TINY, "--checkpoint-every", "-1"], "--checkpoint-every"),
    (["train", "--out", "{out}", *TINY, "--flush-every", "0"], "--flush-every"),
    (["train", "--out", "{out}", *TINY, "--threads", "0"], "--threads"),
    (["train", "--out", "{out}", *TINY, "--experts", "0"], "experts"),
    (["train", "--out", "{out}", *TINY, "--top-k", "9"], "top_k"),
    (["train", "--out", "{out}", *TINY, "--heads", "3"], "heads"),
    (["train", "--out", "{out}", *TINY, "--hidden", "0"], "hidden"),
    (["train", "--out", "{out}", *TINY, "--blocks", "0"], "blocks"),
    (["train", "--out", "{out}", *TINY, "--seq-len", "0"], "seq"),
    (["train", "--out", "{out}", *TINY, "--vocab-size", "1"], "vocab"),
    (["train", "--out", "{out}", *TINY, "--seq-len", "100000000"], "does not fit"),
    (["train", "--out", "{out}", *TINY, "--hidden", "65536", "--heads", "64"], "does not fit"),
    (["train", "--out", "{out}", *TINY, "--data", "{missing}"], "no such file"),
    (["train", "--out", "{out}", *TINY, "--data", "{empty_dir}"], "no text files"),
    (["train", "--out", "{out}", *TINY, "--corpus-mb", "-1"], "--corpus-mb"),  # 0 is valid: no cap
    (["train", "--out", "{out}", *TINY, "--corpus-mb", "nan"], "--corpus-mb"),
    (["train", "--out", "{out}", *TINY, "--ddp-bucket-mb", "0"], "--ddp-bucket-mb"),
    (["train", "--out", "{out}", *TINY, "--device", "gpu"], "invalid choice"),
    (["train", "--out", "{out}", *TINY, "--moe-backend", "megablocks"], "megablocks"),
    (["train", "--out", "{out}", *TINY, "--attention", "int8"], "--attention int8"),
    (["train", "--out", "{text}", *TINY], "not a directory"),
    (["train", "--out", "{out}", "--resume"], "--resume"),
    (["train", "--out", "{empty_dir}", "--resume"], "--resume"),
    (["train", "--out", "{damaged_run}", "--resume"], "config.json"),
    (["train", "--out", "{out}", "--resume", "--model", "gpt-tiny-moe", "--experts", "4"], "--experts"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The inputs the cases name, written once per module."""
    root = tmp_path_factory.mktemp("fuzz-inputs")
    paths = {name: root / name for name in ("missing", "empty_dir", "empty_file", "damaged", "foreign", "text",
                                            "damaged_run")}
    counts, meta = synth.generate(layers=2, experts=8, steps=1200, tokens_per_step=1024, seed=0)
    paths["trace"] = trace.write(root / "trace", counts, meta)
    paths["short"] = trace.write(root / "short.parquet", counts[:60], meta)
    paths["empty_dir"].mkdir()
    paths["empty_file"] = root / "empty.parquet"
    paths["empty_file"].touch()
    whole = paths["short"].read_bytes()
    paths["damaged"] = root / "damaged.parquet"
    paths["damaged"].write_bytes(whole[: len(whole) // 2])
    paths["foreign"] = root / "foreign.parquet"
    pq.write_table(pa.table({"a": np.arange(5)}), paths["foreign"])
    paths["text"].write_text("not a trace\n")
    paths["damaged_run"].mkdir()
    (paths["damaged_run"] / "config.json").write_text('{"model": ')
    (paths["damaged_run"] / "checkpoints").mkdir()
    (paths["damaged_run"] / "checkpoints" / "step-0000000010.pt").write_bytes(b"not a checkpoint")
    return {name: str(path) for name, path in paths.items()}


def run_cli(argv: list[str]) -> int:
    """``moe-trace argv`` in this process: its exit status (argparse's usage errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_the_list_is_long_enough_and_covers_every_subcommand():
    from moe_trace.cli import build_parser

    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert len(CASES) >= 40
    assert {argv[0] for argv, _ in CASES} >= set(subcommands) - {"import"}


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(files, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    argv = [a.format(out=out, **files) for a in args]
    status = run_cli(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


def test_the_console_script_reports_bad_input_the_same_way(files):
    result = subprocess.run([sys.executable, "-m", "moe_trace", "predict", files["trace"], "--horizons", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--horizons" in result.stderr
