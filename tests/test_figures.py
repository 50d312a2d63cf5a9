"""Figure tables in the docs match the JSON that the script which measured them wrote.

A measured table is preceded by ``<!-- figures: PATH -->`` naming its JSON under ``benchmarks/results/``;
``RENDERERS[PATH]`` renders the rows that JSON implies, in the table's own formatting, and the table must hold
exactly those rows. A new measured table is one line in ``RENDERERS`` (and a small renderer).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "traces/README.md", *sorted(p.name for p in (ROOT / "benchmarks").glob("NOTES*.md"))]
MARKER = re.compile(r"^<!-- figures: (\S+) -->\s*$")


def _percent(x: float, signed: bool = False) -> str:
    return f"{x * 100:{'+' if signed else ''}.1f} %"


def _step_s(r: dict) -> float:
    """A run's step time: the mean over whole progress-bar periods since session 8, the median step before."""
    return r.get("step_s", r["median_step_s"])


def _train_throughput(result: dict) -> list[list[str]]:
    return [[r["run"], r["model"] + (f" --experts {r['num_experts']}" if r["num_experts"] != 16 else ""),
             r["optimizer"], "no" if not r["compile"] else "yes", f"{_step_s(r) * 1e3:.1f} ms",
             f"{r['tokens_per_s'] / 1e3:.0f}k", _percent(r["mfu"]), f"{r['peak_gpu_memory_gib']:.1f} GiB"]
            for r in result["results"]]


def _train_throughput_loop(result: dict) -> list[list[str]]:
    return [[r["model"], r["backend"], "yes" if r["compile"] else "no", f"{r['step_s_recorder_off'] * 1e3:.1f} ms",
             f"{r['tokens_per_s'] / 1e3:.0f}k", _percent(r["mfu"]), _percent(r["mfu_preset_batch"]),
             _percent(r["recorder_overhead"], signed=True)] for r in result["results"]]


def _expert_parallel_scaling(result: dict) -> list[list[str]]:
    return [[str(r["gpus"]), str(r["tokens_per_step"]), *_speed(r), _percent(r["efficiency"])]
            for r in result["results"]]


def _speed(r: dict) -> list[str]:
    """A scaling run's step and tokens/s."""
    return [f"{_step_s(r) * 1e3:.1f} ms", f"{r['tokens_per_s'] / 1e3:.1f}k"]


def _scaling(r: dict) -> list[str]:
    """A multi-GPU run's speed-up and efficiency over one GPU (blank for the one-GPU run)."""
    return [f"{r['speedup']:.2f}x" if "speedup" in r else "", _percent(r["efficiency"]) if "efficiency" in r else ""]


def _expert_parallel_scaling_studies(result: dict) -> list[list[str]]:
    return [[r["study"], str(r["gpus"]), str(r["tokens_per_step"]), *_speed(r), *_scaling(r)] for r in result["runs"]]


def _expert_parallel_scaling_windows(result: dict) -> list[list[str]]:
    def exchange(r: dict) -> str:  # recorded since session 8; before, named by the run
        return "none" if r["gpus"] == 1 else r.get("expert_exchange") or (
            "padded" if r["mode"].endswith("_padded") else "counts")

    return [[r["study"], str(r["gpus"]), exchange(r),
             f"{r['window']} ({r['steps_timed'][0]}..{r['steps_timed'][1] - 1})", str(r["tokens_per_step"]),
             *_speed(r), f"{r['busiest_gpu_load']:.2f}", *_scaling(r)] for r in result["runs"]]


def _expert_parallel_scaling_levers(result: dict) -> list[list[str]]:
    return [[r["variant"], r["study"], r["window"], *_speed(r), *_scaling(r)] for r in result["results"]]


def _placement_training(result: dict) -> list[list[str]]:
    return [[str(r["tokens_per_step"]), r["policy"], str(r["redundant"]), str(r["replans"]),
             f"{r['measured_median_step_s'] * 1e3:.1f} ms", f"{r['simulated_step_s'] * 1e3:.1f} ms",
             _percent(r["prediction_error_absolute"], signed=True), f"{r['measured_vs_static']:.3f}",
             f"{r['simulated_vs_static']:.3f}"] for r in result["results"]]


def _paper_comparison(result: dict) -> list[list[str]]:
    return [[t["model"], str(t["tokens_per_step"]), r["predictor"], str(r["horizon"]), _percent(r["step_wape"]),
             _percent(r["step_floor"]), _percent(r["mean_wape"]), "" if r["paper"] is None else _percent(r["paper"])]
            for t in result["traces"] for r in t["rows"] if r["phase"] == "stable"]


def _balancing_study(result: dict) -> list[list[str]]:
    return [[f"`{r['run']}`", f"{result['training'][r['run']]['val_loss']:.3f}", r["layers stable"],
             f"{r['heaviest/mean early']:.2f}", f"{r['heaviest/mean late']:.2f}", f"{r['dropped %']:.1f} %",
             f"{r['mean_wape auto @200'] * 100:.1f} %", f"{r['mean_wape sw_avg:window=100 @200'] * 100:.1f} %",
             f"{r['best step time / static']:.3f}", f"{r['oracle step time / static']:.3f}"]
            for r in result["comparison"]]


def _phase_detection(result: dict) -> list[list[str]]:
    rows = []
    for drift in [*result["trace"]["drifts"], "all"]:
        found = [(s, c["switch_step"]) for c in result["cases"] if drift in ("all", c["drift"])
                 for s in c["stable_from"]]
        errors = [abs(s - switch) for s, switch in found if s is not None]
        rows.append([str(drift), str(len(found)), f"{sum(errors) / len(errors):.0f}", str(max(errors)),
                     str(len(found) - len(errors))])
    return rows


def _trace_summary(result: dict) -> list[list[str]]:
    return [[f"`{Path(t['trace']).name}/`", f"{t['first_step']}..{t['last_step']}",
             f"{t['moe_layers']} x {t['experts']}", str(t["tokens_per_step"]), f"{t['median_step_s'] * 1e3:.1f} ms",
             f"{t['train_loss_first_10']:.2f} -> {t['train_loss_last_100']:.2f}", f"{t['aux_loss_last_1000']:.3f}",
             f"{t['layers_never_stable']} of {t['moe_layers']}"] for t in result["traces"]]


def _attention_gluon(result: dict) -> list[list[str]]:
    def row(r):
        attention = not r["impl"].startswith("quantize")  # the quantization row has no FLOPs of its own
        return [f"B{r['batch']} H{r['heads']} S{r['seq']} D{r['head_dim']} {'causal' if r['causal'] else 'full'}",
                r["impl"], f"{r['ms']:.3f} ms", f"{r['tflops']:.1f}" if attention else "-",
                f"{r['ratio_vs_cudnn']:.2f}x" if attention else "-",
                f"{r['rel_l1'] * 100:.2f} %" if attention else "-"]

    return [row(r) for r in result["records"]]


def _expert_cost_vs_linear(result: dict) -> list[list[str]]:
    """Selected even-split points of the placement calibration beside the linear model (GEMMs at 180 TFLOP/s)."""
    rows = []
    for hidden, ffn, experts in ((768, 3072, 2), (768, 3072, 4), (1024, 4096, 4), (1024, 4096, 16), (1024, 4096, 32)):
        for tokens in (256, 2048, 16384, 131072):
            key = (hidden, ffn, experts, tokens)
            p = next(p for p in result["expert"]
                     if p["split"] == "even" and (p["hidden"], p["ffn"], p["local_experts"], p["tokens"]) == key)
            linear_ms = tokens * 6 * 2 * hidden * ffn / 180e12 * 1e3
            rows.append([f"H{hidden} F{ffn}", str(experts), str(tokens), f"{p['gpu_ms']:.2f}", f"{p['wall_ms']:.2f}",
                         f"{p['compiled_gpu_ms']:.2f}", f"{linear_ms:.2f}", f"{p['gpu_ms'] / linear_ms:.2f}"])
    return rows


def _placement_batch_curve(result: dict) -> list[list[str]]:
    rows = []
    for r in result["results"]:
        static = next(x for x in r["records"] if x["policy"] == "static")
        rows.append([r["model"], str(r["gpus"]), f"{r['tokens_per_step'] // 1024}k", r["noise"],
                     f"{r['mean_tokens_per_gpu_per_layer']:.0f}", f"{static['est_step_time_s'] * 1e3:.2f} ms",
                     _percent(r["saved_by_phase"]), _percent(r["saved_by_history"])])
    return rows


RENDERERS: dict[str, Callable[[dict], list[list[str]]]] = {
    "benchmarks/results/train_throughput.json": _train_throughput,
    "benchmarks/results/train_throughput_step_timing.json": _train_throughput,
    "benchmarks/results/train_throughput_loop_h100.json": _train_throughput_loop,
    "benchmarks/results/expert_parallel_scaling.json": _expert_parallel_scaling,
    "benchmarks/results/expert_parallel_scaling_x2.json": _expert_parallel_scaling_studies,
    "benchmarks/results/expert_parallel_scaling_x4.json": _expert_parallel_scaling_windows,
    "benchmarks/results/expert_parallel_scaling_x2_settled.json": _expert_parallel_scaling_windows,
    "benchmarks/results/expert_parallel_scaling_x2_levers.json": _expert_parallel_scaling_levers,
    "benchmarks/results/expert_parallel_scaling_x2_step_timing.json": _expert_parallel_scaling_windows,
    "benchmarks/results/placement_training_x4.json": _placement_training,
    "benchmarks/results/placement_training_x2.json": _placement_training,
    "benchmarks/results/paper_comparison.json": _paper_comparison,
    "benchmarks/results/phase_detection.json": _phase_detection,
    "benchmarks/results/balancing_study.json": _balancing_study,
    "benchmarks/results/trace_summary.json": _trace_summary,
    "placement/calibration/h200.json": _expert_cost_vs_linear,
    "benchmarks/results/placement_batch_curve.json": _placement_batch_curve,
    "benchmarks/results/placement_batch_curve_linear.json": _placement_batch_curve,
    "benchmarks/results/attention_gluon.json": _attention_gluon,
    "benchmarks/results/attention_gluon_runs/2_pipelined.json": _attention_gluon,
}


def figure_tables(text: str) -> list[tuple[str, list[list[str]]]]:
    """``(json path, body rows as cells)`` for every table that follows a figures marker."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        table = []
        for row in lines[i + 1:]:
            if not row.startswith("|"):
                break
            table.append([cell.strip() for cell in row.strip().strip("|").split("|")])
        assert len(table) > 2 and set("".join(table[1])) <= set("-: "), f"no table after {line!r}"
        found.append((match.group(1), table[2:]))
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_figure_tables_match_their_json(doc):
    path = ROOT / doc if (ROOT / doc).exists() else ROOT / "benchmarks" / doc
    for source, rows in figure_tables(path.read_text()):
        assert source in RENDERERS, f"{doc}: no renderer for {source}; add one to RENDERERS"
        result = json.loads((ROOT / source).read_text())
        assert sorted(rows) == sorted(RENDERERS[source](result)), f"{doc}: the table of {source} is stale"


def test_every_renderer_has_its_table():
    named = {source for doc in DOCS for source, _ in figure_tables(
        (ROOT / doc if (ROOT / doc).exists() else ROOT / "benchmarks" / doc).read_text())}
    assert named == set(RENDERERS)


def test_the_checker_finds_a_wrong_figure():
    text = "<!-- figures: x.json -->\n| a | b |\n|---|---|\n| 1 | 2.0 ms |\n\nprose\n"
    assert figure_tables(text) == [("x.json", [["1", "2.0 ms"]])]


def test_the_compile_help_quotes_the_measured_speed_up():
    from moe_trace.commands import train

    result = json.loads((ROOT / "benchmarks/results/train_throughput_loop_h100.json").read_text())
    step = {r["compile"]: r["step_s_recorder_off"] for r in result["results"] if r["backend"] == "torch"}
    subparsers = argparse.ArgumentParser().add_subparsers()
    train.register(subparsers)
    [parser] = subparsers.choices.values()
    [compile_help] = [a.help for a in parser._actions if "--compile" in a.option_strings]
    assert f"{step[False] / step[True]:.2f}x faster" in compile_help
