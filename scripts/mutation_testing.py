"""Mutation testing of the modules whose numbers moe-trace reports (not run in CI: it takes hours on 2 cores).

A mutant is a copy of a module with one small plausible bug planted (an operator swapped, a constant nudged, an
argument dropped); a mutant the tests still pass on "survives" and shows a property the suite does not pin.

    python scripts/mutation_testing.py known                   # issue 18's four mutants: each must fail the suite
    python scripts/mutation_testing.py run [MODULE ...]        # mutmut on each module against its own tests
    python scripts/mutation_testing.py replay MODULE --open    # after new tests: plant the open survivors again
    python scripts/mutation_testing.py report                  # benchmarks/results/mutation_report.md

mutmut picks a mutant's tests by what calls the mutated function in the test process: work a test does in a
child process (the two-rank recorder test) or reads from a signature (the protocol defaults test) is invisible to
it; ``replay`` plants the survivor in the source and runs whole test files, which sees both.

Why mutmut (3.x) and not cosmic-ray: mutmut writes every mutant of a file into one copy of it, switched at run
time, and runs the tests in processes forked from one warmed-up pytest session, each mutant against only the tests
that call the mutated function. Cosmic-ray runs a fresh test command per mutant: on this project that is importing
torch and collecting the tests again for each of a few thousand mutants, days instead of hours on two shared cores.

Two kinds of code are not mutated, to spend the CPU where a figure can change: lines the module's tests do not
execute on the CPU (the CUDA branches, which the GPU tests cover on the lead's GPU runs) and ``raise`` statements
(an error message cannot change a reported number; the conditions that raise are mutated).

Each module runs in its own copy of the repository under ``--workdir`` (mutmut keeps its results there, so a
rerun only tests what changed) with the narrowest test selection that exercises it (``MODULES``); ``run`` writes
``benchmarks/results/mutation/<module>.json`` (counts and every surviving mutant's diff), and ``report`` turns
those, with the explanations in ``EQUIVALENT`` for survivors that cannot change a result, into the report.
Run it ``nice``d: ``nice -n 19 python scripts/mutation_testing.py run moe_trace/moe.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "mutation"
REPORT = ROOT / "benchmarks" / "results" / "mutation_report.md"

# test_expert_placement's tests of the dispatch table and the online policies (its others train, for minutes)
EXPERT_PLACEMENT_PURE = [f"tests/test_expert_placement.py::{t}" for t in (
    "test_routes_round_each_copys_share_to_whole_tokens_by_largest_remainder",
    "test_routes_need_a_one_layer_plan_over_the_ranks", "test_expert_tokens_add_up_to_the_gpus_tokens",
    "test_online_policies_take_the_simulators_decisions")]

# module -> the tests that exercise it (tests that only reach it through a subprocess cannot see a mutant)
MODULES = {
    "moe_trace/moe.py": ["tests/test_moe.py"],
    # test_record's harness test: the hooks feeding a recorder (its transformers families take seconds each)
    "moe_trace/recorder.py": ["tests/test_recorder.py",
                              "tests/test_record.py::test_harness_gpt_is_recorded_through_the_same_hooks"],
    "moe_trace/trace.py": ["tests/test_trace.py", "tests/test_recorder.py", "tests/test_synth.py",
                           "tests/test_fuzz.py::test_bad_input_is_one_line_exit_2_and_leaves_nothing"],
    "predictors/evaluate.py": ["tests/test_predictors.py", "tests/test_cli_predict.py"],
    "predictors/phases.py": ["tests/test_phases.py", "tests/test_cli_predict.py"],
    "placement/dispatch.py": ["tests/test_placement.py", "tests/test_simulate.py", *EXPERT_PLACEMENT_PURE],
    "placement/planners.py": ["tests/test_placement.py", "tests/test_simulate.py", "tests/test_place_formats.py",
                              *EXPERT_PLACEMENT_PURE],
    "placement/cost.py": ["tests/test_cost_model.py", "tests/test_simulate.py", "tests/test_placement.py",
                          *EXPERT_PLACEMENT_PURE],
}

# Issue 18's four mutants, which all passed the suite when it was filed: (name, file, original, mutant, tests).
KNOWN = [
    ("look-ahead: the predictor is fitted on the step it is scored on", "predictors/evaluate.py",
     "predictor.fit(proportions[:t0])", "predictor.fit(proportions[:t0 + 1])", ["tests/test_predictors.py"]),
    ("look-behind: the predictor misses the last step before the origin", "predictors/evaluate.py",
     "predictor.fit(proportions[:t0])", "predictor.fit(proportions[:t0 - 1])", ["tests/test_predictors.py"]),
    ("step_floor from the horizon's median instead of its mean", "predictors/evaluate.py",
     "return step_wape(actual.mean(axis=0), actual)", "return step_wape(np.median(actual, axis=0), actual)",
     ["tests/test_predictors.py"]),
    ("load-balancing loss with P_e detached", "moe_trace/moe.py",
     "(assigned_fraction * probs.mean(dim=0)).sum()", "(assigned_fraction * probs.mean(dim=0).detach()).sum()",
     ["tests/test_moe.py"]),
    ("z-loss as the square of the mean", "moe_trace/moe.py",
     "torch.logsumexp(logits, dim=-1).square().mean()", "torch.logsumexp(logits, dim=-1).mean().square()",
     ["tests/test_moe.py"]),
]



def _same(module: str, function: str, why: str, *lines: str) -> dict[tuple[str, str, str], str]:
    """``EQUIVALENT`` entries for several mutants of one function that share a reason."""
    return {(module, function, line): why for line in lines}


_STABLE = "numpy takes the sort kind case-insensitively"
_NEGATIVE_RESHAPE = "numpy's reshape infers a dimension given any negative size, not only -1"
_DEFAULT_LAST_AXIS = "the axis left out defaults to the last, which is the one named"

# Survivors that cannot change a result: (module, mutated function, the mutant's changed line) -> why.
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("moe_trace/moe.py", "MoELayer.forward", "order = routing.expert_indices.flatten().argsort(stable=False)"):
        "the rows are put back by the inverse of the same permutation, and an expert's output for a row does not "
        "depend on the order of the rows around it; stability only keeps the order reproducible",
    **_same("moe_trace/moe.py", "route", "route's logits are always [tokens, experts], so dim 1 is the last dim",
            "probs = logits.softmax(dim=+1)", "weights, indices = probs.topk(top_k, dim=+1)",
            "weights = weights / weights.sum(dim=+1, keepdim=True)",
            "z_loss = torch.logsumexp(logits, dim=+1).square().mean()"),
    ("moe_trace/moe.py", "route", "weights, indices = probs.topk(top_k, )"): "topk's default dim is the last",
    **_same("moe_trace/moe.py", "route", "the same on the CPU; on CUDA the counts would land on the host and "
            "scatter_add_ with CUDA indices fails, which test_moe.py's GPU test (grouped_mm backend) reports",
            "tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=None).scatter_add_(",
            "tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, ).scatter_add_("),
    ("moe_trace/moe.py", "MoELayer.__init__", "self.router = nn.Linear(hidden, num_experts, bias=None)"):
        "nn.Linear treats a falsy bias as no bias",
    **_same("moe_trace/moe.py", "MoELayer.__init__", "read only after a forward, which sets it",
            'self.tokens_per_expert: Tensor | None = ""', 'self.aux_loss: Tensor | None = ""'),
    **{("predictors/evaluate.py", "score", line): "each horizon is scored on predict(h) of the same fit, whatever "
       "the order; longest first only lets a predictor reuse its longest forecast (speed)" for line in (
           "for h in sorted(horizons, ):  # longest first: a predictor may reuse its longest forecast",
           "for h in sorted(horizons, reverse=False):  # longest first: a predictor may reuse its longest forecast")},
    **{("predictors/evaluate.py", "evaluate", line): "only chooses between the serial loop and the process pool, "
       "which give the same scores (test_predictors.py::test_processes_give_the_same_scores_as_one)" for line in (
           "workers = workers or os.cpu_count() and 1", "workers = workers and os.cpu_count() or 1",
           "workers = workers or os.cpu_count() or 2",
           "if predictor.parallel or workers > 1 and len(all_origins) > 1:",
           "if predictor.parallel and workers >= 1 and len(all_origins) > 1:",
           "if predictor.parallel and workers > 2 and len(all_origins) > 1:",
           "if predictor.parallel and workers > 1 and len(all_origins) >= 1:",
           "if predictor.parallel and workers > 1 and len(all_origins) > 2:")},
    ("predictors/evaluate.py", "evaluate", "progress(None)"): "the progress display's step count; no figure",
    **_same("predictors/evaluate.py", "evaluate", "the progress display's step count; no figure",
            "merge(future.result(), None)", "merge(score(predictor, proportions, horizons, [t0]), None)",
            "merge(score(predictor, proportions, horizons, [t0]), 2)"),
    **_same("predictors/evaluate.py", "evaluate", "only how the origins are split among the processes, or how many "
            "processes there are, which give the same scores (test_predictors.py::"
            "test_processes_give_the_same_scores_as_one)",
            "chunks = [c.tolist() for c in np.array_split(all_origins, min(len(all_origins), 2 / workers)) if len(c)]",
            "chunks = [c.tolist() for c in np.array_split(all_origins, min(len(all_origins), 3 * workers)) if len(c)]",
            "with ProcessPoolExecutor(None, initializer=_set_shared, initargs=(proportions,)) as pool:",
            "with ProcessPoolExecutor(initializer=_set_shared, initargs=(proportions,)) as pool:"),
    ("predictors/evaluate.py", "evaluate", "rows.sort(key=None)"):
        "a horizon's origins are distinct, so the (origin, errors) tuples sort by origin without comparing errors",
    **_same("predictors/evaluate.py", "origins", "numpy >= 2's default integer is int64 on every platform",
            "return np.arange(min_history, n_steps - horizon + 1, stride, dtype=None)",
            "return np.arange(min_history, n_steps - horizon + 1, stride, )"),
    **{("predictors/evaluate.py", "phase_masks", line): "numpy >= 2's default integer is int64 on every platform, "
       "which holds the sentinel" for line in (
           "starts = np.array([np.iinfo(np.int64).max if s is None else s for s in stable_from], dtype=None)",
           "starts = np.array([np.iinfo(np.int64).max if s is None else s for s in stable_from], )")},
    # placement/dispatch.py
    **_same("placement/dispatch.py", "routes", "its caller (expert_parallel) passes the int64 token counts "
            "all-gathered from the ranks, which np.asarray keeps as they are",
            "counts_by_rank = np.asarray(counts_by_rank, dtype=None)", "counts_by_rank = np.asarray(counts_by_rank, )"),
    ("placement/dispatch.py", "routes",
     "remainder = np.where(hosts, share - whole, -2.0)  # the missing tokens go to hosts only"):
        "remainders of hosts are in [0, 1): any negative value ranks the other GPUs last",
    **_same("placement/dispatch.py", "routes", "the inner argsort returns a permutation, whose values are distinct: "
            "the outer one has no ties to break",
            'rank_of = np.argsort(np.argsort(-remainder, axis=0, kind="stable"), axis=0, kind=None)',
            'rank_of = np.argsort(np.argsort(-remainder, axis=0, kind="stable"), axis=0, )'),
    **_same("placement/dispatch.py", "routes", "only GPUs with equal remainders of one expert are ranked otherwise: "
            "every such choice rounds the shares equally close, "
            "sends every token once, and every rank computes the same table from the same counts",
            'rank_of = np.argsort(np.argsort(-remainder, axis=0, kind=None), axis=0, kind="stable")',
            'rank_of = np.argsort(np.argsort(-remainder, axis=0, ), axis=0, kind="stable")'),
    **_same("placement/dispatch.py", "routes", _STABLE,
            'rank_of = np.argsort(np.argsort(-remainder, axis=0, kind="STABLE"), axis=0, kind="stable")',
            'rank_of = np.argsort(np.argsort(-remainder, axis=0, kind="stable"), axis=0, kind="STABLE")'),
    ("placement/dispatch.py", "routes", "first_on_gpu = hosted | ~_seen_before(gpu * (experts + 1) + slot_expert)"):
        "the empty slots it adds take runs among the empty slots' own group (expert -1) in run_starts, and the "
        "return gives empty slots no rows",
    **_same("placement/dispatch.py", "routes", "the key stays distinct for every (GPU, expert or -1) pair",
            "first_on_gpu = hosted & ~_seen_before(gpu * (experts + 1) - slot_expert)",
            "first_on_gpu = hosted & ~_seen_before(gpu * (experts + 2) + slot_expert)"),
    ("placement/dispatch.py", "_seen_before", "seen[first] = None"): "numpy stores None in a bool array as False",
    **_same("placement/dispatch.py", "_checked", "every use of counts combines them with float64 arrays, so integer "
            "counts give the same float64 tokens", "counts = np.asarray(counts, dtype=None)",
            "counts = np.asarray(counts, )"),
    ("placement/dispatch.py", "_even", "return per_slot.reshape(*per_slot.shape[:2], plan.gpus, -2).sum(axis=-1)"):
        _NEGATIVE_RESHAPE,
    **_same("placement/dispatch.py", "_balanced", _NEGATIVE_RESHAPE,
            "tokens = np.concatenate([even, np.zeros((*even.shape[:2], 1))], axis=2).transpose(1, 2, 0)"
            ".reshape(-2, len(even))",
            "return np.ascontiguousarray(tokens.reshape(layers, gpus + 1, -2)[:, :gpus].transpose(2, 0, 1))"),
    **_same("placement/dispatch.py", "_balanced", "re-pouring an expert over its one GPU (or a padding column at "
            "_FULL) gives it all its tokens again, which is the even split (to the last bit of rounding)",
            "replicated = hosting_gpus >= 1", "valid = np.arange(order.shape[1])[None, :] <= n_replicated[:, None]",
            "width = (gpu_ids <= gpus).sum(axis=2).max(axis=0)  # [K]: GPUs the k-th expert spans, at most over "
            "layers"),
    ("placement/dispatch.py", "_balanced", "if n_replicated.max(initial=None) == 0:"):
        "a plan has at least one layer, and numpy takes initial=None as no initial value",
    ("placement/dispatch.py", "_balanced", "if n_replicated.max(initial=1) == 0:"):
        "without a replicated expert the loops that follow run zero times and return the even split",
    ("placement/dispatch.py", "_balanced", "heaviness = np.where(replicated, counts.sum(axis=0), -2.0)"):
        "loads are non-negative: any negative value ranks the experts without replicas last",
    ("placement/dispatch.py", "_balanced",
     'order = np.argsort(-heaviness, axis=1, kind="STABLE")[:, : n_replicated.max()]  # [layers, K]'): _STABLE,
    **_same("placement/dispatch.py", "_balanced", _DEFAULT_LAST_AXIS,
            'order = np.argsort(-heaviness, kind="stable")[:, : n_replicated.max()]  # [layers, K]',
            "expert_hosts = np.take_along_axis(hosts, order[:, None, :], ).transpose(0, 2, 1)  # [layers, K, gpus]",
            "gpu_ids = np.sort(np.where(expert_hosts, np.arange(gpus), gpus), )[:, :, : int(hosting_gpus.max())]"),
    **_same("placement/dispatch.py", "_balanced", "the padding row is only read through the index gpus, which holds "
            "zeros of either type or count",
            "padded_counts = np.concatenate([slot_counts, np.zeros((layers, 1, slot_counts.shape[2]), None)], axis=1)",
            "padded_counts = np.concatenate([slot_counts, np.zeros((layers, 1, slot_counts.shape[2]), )], axis=1)",
            "padded_counts = np.concatenate([slot_counts, np.zeros((layers, 2, slot_counts.shape[2]), np.int64)], "
            "axis=1)"),
    ("placement/dispatch.py", "water_fill", "k = np.arange(1, len(lowest_first) + 1).reshape(-2, *[1] * amount.ndim)"):
        _NEGATIVE_RESHAPE,
    ("placement/dispatch.py", "water_fill",
     "n_filled = (candidate >= lowest_first).sum(axis=0)  # lam = candidate[max(n_filled, 1) - 1]"):
        "a bin exactly at the final level adds nothing: the level computed with it is the same",
    ("placement/dispatch.py", "water_fill", "for j in range(len(candidate)):"):
        "the extra first pass sets lam to candidate[0], which it already is",
    # moe_trace/trace.py
    **{("moe_trace/trace.py", function, line): "the compression codec does not change what is read back, and "
       "pyarrow takes a codec's name in any case" for function in ("write_part", "write", "truncate") for line in (
           "atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression=None))",
           "atomic_write(path, lambda tmp: pq.write_table(table, tmp, ))",
           'atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="ZSTD"))',
           "atomic_write(new, lambda tmp, kept=kept: pq.write_table(kept, tmp, compression=None))",
           "atomic_write(new, lambda tmp, kept=kept: pq.write_table(kept, tmp, ))",
           'atomic_write(new, lambda tmp, kept=kept: pq.write_table(kept, tmp, compression="ZSTD"))')},
    ("moe_trace/trace.py", "_now", 'return _dt.datetime.now(None).isoformat(timespec="seconds")'):
        "the creation time in the metadata loses its zone; no figure reads it",
    ("moe_trace/trace.py", "_arrow_schema",
     "def _arrow_schema(meta: Mapping[str, Any], dropped: bool = True) -> pa.Schema:"):
        "its one caller (_part_table) passes dropped",
    **_same("moe_trace/trace.py", "_arrow_schema", "the order of the keys in the metadata's JSON text; readers "
            "parse it into the same dict",
            "return pa.schema(fields, metadata={META_KEY: json.dumps(dict(meta), sort_keys=None).encode()})",
            "return pa.schema(fields, metadata={META_KEY: json.dumps(dict(meta), ).encode()})",
            "return pa.schema(fields, metadata={META_KEY: json.dumps(dict(meta), sort_keys=False).encode()})"),
    ("moe_trace/trace.py", "_list_array", "flat = pa.array(np.ascontiguousarray(values, dtype=np.int64)"
     ".reshape(-2))"): _NEGATIVE_RESHAPE,
    **_same("moe_trace/trace.py", "write", "numpy >= 2's default integer is int64 on every platform",
            "steps = np.arange(counts.shape[0], dtype=None) if steps is None else np.asarray(steps)",
            "steps = np.arange(counts.shape[0], ) if steps is None else np.asarray(steps)"),
    **_same("moe_trace/trace.py", "truncate", "pyarrow infers int64 for a Python int, the type of the step column",
            'kept = table.filter(pa.compute.less(table["step"], pa.scalar(from_step, None)))',
            'kept = table.filter(pa.compute.less(table["step"], pa.scalar(from_step, )))'),
    **_same("moe_trace/trace.py", "_check_disjoint", "only which of the two files holding a step is named first in "
            "the refusal; the refusal is the same", "order = np.argsort(steps, kind=None)",
            "order = np.argsort(steps, )", 'order = np.argsort(steps, kind="STABLE")'),
    **_same("moe_trace/trace.py", "_per_expert", "the column has no nulls, so numpy gets it with or without a copy",
            "lengths = pa.compute.list_value_length(column).to_numpy(zero_copy_only=None)",
            "lengths = pa.compute.list_value_length(column).to_numpy(zero_copy_only=True)",
            "return column.flatten().to_numpy(zero_copy_only=None).reshape(-1, n_experts)",
            "return column.flatten().to_numpy(zero_copy_only=True).reshape(-1, n_experts)"),
    ("moe_trace/trace.py", "_per_expert", "return column.flatten().to_numpy(zero_copy_only=False).reshape(-2, "
     "n_experts)"): _NEGATIVE_RESHAPE,
    **_same("moe_trace/trace.py", "_assemble", "numpy >= 2's default integer is int64 on every platform",
            "layer_index = np.full(max(layer_ids) + 1, -1, dtype=None)",
            "layer_index = np.full(max(layer_ids) + 1, -1, )"),
    ("moe_trace/trace.py", "_assemble", "layer_index = np.full(max(layer_ids) + 2, -1, dtype=np.int64)"):
        "adds one more block id marked -1 (not a MoE layer), which the same check refuses",
    ("moe_trace/trace.py", "_assemble", "layer_index = np.full(max(layer_ids) + 1, -2, dtype=np.int64)"):
        "any negative value marks a block that is not a MoE layer",
    ("moe_trace/trace.py", "_assemble", "if (steps2 != steps2[:, :1]).any() or (layer_index[layers].reshape(-2, "
     "n_layers)"): _NEGATIVE_RESHAPE,
    ("moe_trace/trace.py", "_assemble", "steps2 = steps.reshape(-2, n_layers)"): _NEGATIVE_RESHAPE,
    **_same("moe_trace/trace.py", "_assemble", "copy only decides whether numpy copies; the values are the same",
            "counts = flat.reshape(shape).astype(np.int64, copy=None)",
            "counts = flat.reshape(shape).astype(np.int64, )",
            "counts = flat.reshape(shape).astype(np.int64, copy=True)",
            "dropped = flat_dropped[order].reshape(shape).astype(np.int64, copy=None)",
            "dropped = flat_dropped[order].reshape(shape).astype(np.int64, )",
            "dropped = flat_dropped[order].reshape(shape).astype(np.int64, copy=True)"),
    **_same("moe_trace/trace.py", "_list_array", "pyarrow casts the list values and offsets to the schema's types "
            "when the table is built: the round-trip tests (int32 counts among them) read back the same counts",
            "flat = pa.array(np.ascontiguousarray(values, dtype=None).reshape(-1))",
            "flat = pa.array(np.ascontiguousarray(values, ).reshape(-1))",
            "offsets = pa.array(np.arange(0, len(flat) + 1, values.shape[2], dtype=None))",
            "offsets = pa.array(np.arange(0, len(flat) + 1, values.shape[2], ))"),
    **_same("moe_trace/trace.py", "_part_table", "pyarrow casts the column to the schema's type when the table is "
            "built (int32 block ids; int64 steps, exact in float64 below 2^53)",
            'layer_ids = np.asarray(meta["moe_layers"], dtype=None)', 'layer_ids = np.asarray(meta["moe_layers"], )',
            "columns = [pa.array(np.repeat(steps.astype(None), n_layers)), pa.array(np.tile(layer_ids, n_steps)),"),
    **_same("moe_trace/trace.py", "_checked", "_part_table writes the steps as int64 whatever type np.asarray "
            "gives (a list of ints is int64 already)", "steps = np.asarray(steps, dtype=None)",
            "steps = np.asarray(steps, )"),
    ("moe_trace/trace.py", "compact", "trace = _load_parts([p for _, _, p in live], None)"):
        "only the path a refusal's message names while merging parts, which a writer's own parts never trigger",
    ("moe_trace/trace.py", "_assemble", 'flat_dropped = _per_expert(table, "dropped", n_experts, None) if '
     '"dropped" in table.column_names else None'):
        "only the file named in the refusal of a dropped list of the wrong length",
    **_same("moe_trace/trace.py", "write_metrics", "np.asarray gives the same array from the lists and arrays callers "
            "pass (MetricsLog passes lists)",
            "arrays = {c: np.asarray(list(columns[c]) if (not isinstance(columns[c], np.ndarray)) and False else "
            "columns[c])",
            "arrays = {c: np.asarray(list(columns[c]) if (not isinstance(columns[c], np.ndarray)) or True else "
            "columns[c])",
            "arrays = {c: np.asarray(list(columns[c]) if isinstance(columns[c], np.ndarray) else columns[c])"),
    **_same("moe_trace/trace.py", "write_metrics", "pyarrow infers the same types from what callers pass (int "
            "steps and tokens, float losses, rates and times): the values read back are the same",
            '"step": pa.array(arrays["step"], None),', '"step": pa.array(arrays["step"], ),',
            "**{c: pa.array(arrays[c], None) for c in METRIC_COLUMNS[1:-1]},",
            "**{c: pa.array(arrays[c], ) for c in METRIC_COLUMNS[1:-1]},",
            '"tokens": pa.array(arrays["tokens"], None),', '"tokens": pa.array(arrays["tokens"], ),'),
    **_same("moe_trace/trace.py", "load_metrics", "metrics_path of a path to metrics.parquet is that file itself, so "
            "taking the branch for it or not reads the same file",
            'if path.suffix == ".parquet" or path.name != "metrics.parquet":',
            'if path.suffix != "XX.parquetXX" or path.name != "metrics.parquet":',
            'if path.suffix != ".PARQUET" or path.name != "metrics.parquet":',
            'if path.suffix != ".parquet" or path.name != "XXmetrics.parquetXX":',
            'if path.suffix != ".parquet" or path.name != "METRICS.PARQUET":'),
    # moe_trace/recorder.py
    **_same("moe_trace/recorder.py", "is_distributed", "the default group holds `group`: they differ only for a "
            "group of one rank, whose all-reduce is the identity, whose world size is 1 and whose rank is 0",
            "return dist.is_available() and dist.is_initialized() and dist.get_world_size(None) > 1"),
    ("moe_trace/recorder.py", "Recorder._copy_to_host", "if is_distributed(None):"):
        "the default group holds `group`: they differ only for a group of one rank, whose all-reduce is the identity",
    ("moe_trace/recorder.py", "is_distributed",
     "return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) >= 1"):
        "with one rank the all-reduce is the identity, the world size 1 and the rank 0, as when not distributed",
    ("moe_trace/recorder.py", "Recorder.__init__",
     "block: int = 26, write: bool = True, group: dist.ProcessGroup | None = None,"):
        "the block size only sets how many steps reach the host at once; every step is written whatever it is",
    ("moe_trace/recorder.py", "Recorder.__init__", "shape = (2 + dropped, self.num_layers, self.num_experts)"):
        "adds a row nothing writes or reads: the counts stay row 0 and the dropped row 1",
    **_same("moe_trace/recorder.py", "Recorder.__init__", "mark_static_address only lets CUDA-graph replay "
            "(--compile-mode reduce-overhead) capture the hooks' additions; without it the graphs are skipped, the "
            "counts are the same", 'if device.type != "cuda":', 'if device.type == "XXcudaXX":',
            'if device.type == "CUDA":'),
    **{("moe_trace/recorder.py", function, line): "the same on the CPU; on CUDA a host tensor here either fails "
       "loudly or costs a copy (the GPU no-sync test of test_recorder.py reports a sync), and cannot change a count"
       for function, line in (
           ("Recorder.__init__", "self._current = torch.zeros(shape, dtype=torch.int64, device=None)"),
           ("Recorder.__init__", "self._current = torch.zeros(shape, dtype=torch.int64, )"),
           ("Recorder.__init__", "self._buffer = torch.zeros((block, *shape), dtype=torch.int64, device=None)"),
           ("Recorder.__init__", "self._buffer = torch.zeros((block, *shape), dtype=torch.int64, )"),
           ("Recorder.layer_index", "return torch.tensor([layer], device=None)"),
           ("Recorder.layer_index", "return torch.tensor([layer], )"),
           ("Recorder._add", "layer = torch.tensor([layer], device=None)"),
           ("Recorder._add", "layer = torch.tensor([layer], )"),
           ("Recorder.add_expert_ids", "counts = torch.zeros(self.num_experts, dtype=torch.int64, device=None)"),
           ("Recorder.add_expert_ids", "counts = torch.zeros(self.num_experts, dtype=torch.int64, )"))},
    **{("moe_trace/recorder.py", function, line): "the same on the CPU; on CUDA the copy to the host becomes "
       "synchronous (slower, and a sync the GPU no-sync test reports); the counts are the same"
       for function, line in (
           ("Recorder.__init__", 'self._pin = device.type == "XXcudaXX"'),
           ("Recorder.__init__", 'self._pin = device.type == "CUDA"'),
           ("Recorder._copy_to_host", "host = torch.empty(block.shape, dtype=torch.int64, pin_memory=None)"),
           ("Recorder._copy_to_host", "host = torch.empty(block.shape, dtype=torch.int64, )"),
           ("Recorder._copy_to_host", "host.copy_(block, )"))},
    ("moe_trace/recorder.py", "Recorder.__init__",
     "self._sequences, self._seq_len = 0, 1  # input shapes seen in the current step (add_sequences)"):
        "_seq_len is read only in a step where add_sequences ran, which sets it",
    **_same("moe_trace/recorder.py", "Recorder.__init__", "None is falsy like False", "self._truncated = None"),
    ("moe_trace/recorder.py", "Recorder.flush", "self._truncated = None"): "None is falsy like False",
    ("moe_trace/recorder.py", "Recorder.flush", "self._truncated = False"):
        "truncating again at a later flush, from its first step, removes nothing: every step written before is "
        "earlier",
    ("moe_trace/recorder.py", "Recorder.step", "if len(self._steps) != len(self._buffer):"):
        "copies every step to the host instead of every block of steps: the same counts reach the trace, with "
        "more (non-blocking) copies and all-reduces",
    **_same("moe_trace/recorder.py", "_on_host", "the steps are Python ints, which numpy stores as int64 anyway",
            "steps = np.concatenate([np.asarray(s, dtype=None) for s, _, _ in blocks])",
            "steps = np.concatenate([np.asarray(s, ) for s, _, _ in blocks])"),
    # placement/cost.py
    **_same("placement/cost.py", "CostModel.expert_time_s", "its callers pass the float64 tokens gpu_tokens returns, "
            "and an integer array times this float factor is float64 too",
            "return np.asarray(tokens, dtype=None) * (3 * 2 * self.expert_params / self.matmul_flops)",
            "return np.asarray(tokens, ) * (3 * 2 * self.expert_params / self.matmul_flops)"),
    **_same("placement/cost.py", "CostModel.all_to_all_time_s", "its callers pass the float64 tokens gpu_tokens "
            "returns, for which asarray changes nothing",
            "remote_bytes = np.asarray(tokens, dtype=None) * self.activation_bytes * self.hidden * (gpus - 1) / gpus",
            "remote_bytes = np.asarray(tokens, ) * self.activation_bytes * self.hidden * (gpus - 1) / gpus"),
    ("placement/cost.py", "CostModel.migration_time_s", "if arrivals.size == 1:"):
        "no arrivals sum to 0.0 anyway, and a single entry is one GPU's, which hosts every expert and so never "
        "receives one",
    # predictors/phases.py
    ("predictors/phases.py", "parameters_for", "if n_steps > SHORT_TRACE:"):
        "at n_steps = SHORT_TRACE the scale is 1, which gives the defaults",
    ("predictors/phases.py", "movement", "if n_blocks < lag:"):
        "with n_blocks == lag the slices are empty and give the same (0, layers) array",
    ("predictors/phases.py", "movement", "noise = np.sqrt(4 * within_var / (np.pi * block)).sum(axis=+1)  # E "
     "sum_e |m_k - m_j| for a constant load"): "within_var is [layers, experts]: axis 1 is the last",
    **_same("predictors/phases.py", "stable_from", "ruptures.Pelt's defaults are model='l2' and min_size=2",
            'ends = ruptures.Pelt(min_size=2, jump=1).fit(log_d).predict(pen=pen)',
            'ends = ruptures.Pelt(model="l2", jump=1).fit(log_d).predict(pen=pen)'),
    **_same("predictors/phases.py", "_quiet_start", "the two lists have the same length by construction",
            "for seg_start, seg_end in reversed(list(zip([0, *ends[:-1]], ends, strict=None))):",
            "for seg_start, seg_end in reversed(list(zip([0, *ends[:-1]], ends, ))):",
            "for seg_start, seg_end in reversed(list(zip([0, *ends[:-1]], ends, strict=False))):"),
    # placement/planners.py
    ("placement/planners.py", "_check", "if gpus < 1 and slots_per_gpu < 1 or redundant < 0:"):
        "no GPU or no slot alone leaves no room, which the next check refuses (a PlacementError either way)",
    **_same("placement/planners.py", "contiguous", "_check has refused experts + redundant > gpus * slots_per_gpu "
            "already, which implies this condition (the check was removed since as dead code)",
            "if +(-experts // gpus) > slots_per_gpu:", "if -(-experts / gpus) > slots_per_gpu:",
            "if -(+experts // gpus) > slots_per_gpu:"),
    **{("placement/planners.py", function, line): "np.full of the int -1 is int64" for function, line in (
        ("contiguous", "slot_expert = np.full((layers, gpus * slots_per_gpu), -1, dtype=None)"),
        ("contiguous", "slot_expert = np.full((layers, gpus * slots_per_gpu), -1, )"),
        ("pack", "slot_expert = np.full((layers, gpus * slots_per_gpu), -1, dtype=None)"),
        ("pack", "slot_expert = np.full((layers, gpus * slots_per_gpu), -1, )"),
        ("exact", "slot_expert = np.full((layers, gpus * slots_per_gpu), -1, dtype=None)"),
        ("exact", "slot_expert = np.full((layers, gpus * slots_per_gpu), -1, )"))},
    **_same("placement/planners.py", "_check", "every use of the loads divides them, which gives float64 for "
            "integer loads too", "loads = np.asarray(loads, dtype=None)", "loads = np.asarray(loads, )"),
    **_same("placement/planners.py", "plan", "each planner's _check converts the loads to float64 again",
            "loads = np.asarray(loads, dtype=None)", "loads = np.asarray(loads, )"),
    ("placement/planners.py", "pack",
     "expert_of = np.repeat(np.tile(np.arange(experts), layers), replicas.ravel()).reshape(layers, -2)"):
        _NEGATIVE_RESHAPE,
    **_same("placement/planners.py", "pack", _DEFAULT_LAST_AXIS,
            "weight = np.take_along_axis(loads / replicas, expert_of, )",
            "order = np.lexsort((expert_of, -weight), )  # heaviest first; replicas of an expert adjacent",
            "expert_of = np.take_along_axis(expert_of, order, )", "weight = np.take_along_axis(weight, order, )"),
    **_same("placement/planners.py", "pack", "a float 0/1 array selects in np.where and is set by masks as the "
            "bool one", "holds_current = np.zeros((layers, gpus), dtype=None)  # GPUs holding the expert being placed",
            "holds_current = np.zeros((layers, gpus), )  # GPUs holding the expert being placed"),
    ("placement/planners.py", "pack", "holds_current[expert != previous] = None"):
        "numpy stores None in a bool array as False",
    **_same("placement/planners.py", "exact", "only a solve running past a minute stops at the best placement found "
            "so far instead of the optimum; no committed figure comes from the exact planner (tests solve small "
            "cases in well under a second)", "time_limit_s: float = 61.0) -> Plan:", "options=None)",
            'result = milp(cost, constraints=constraints, integrality=integrality, options={"time_limit": '
            'time_limit_s})', ")", 'options={"XXtime_limitXX": time_limit_s})',
            'options={"TIME_LIMIT": time_limit_s})'),
    **_same("placement/planners.py", "exact", "moves the size refused as too large by one cell (64 experts x 64 "
            "GPUs); no command or benchmark plans that size", "if experts * gpus >= 4096:",
            "if experts * gpus > 4097:"),
    ("placement/planners.py", "exact",
     "LinearConstraint(np.hstack([eye_e, zeros, np.zeros((experts, 1))]), 1, ),"):
        "x is binary, so an expert is on at most `gpus` GPUs without the upper bound",
    ("placement/planners.py", "exact",
     "LinearConstraint(np.hstack([np.ones((1, n)), np.zeros((1, n + 1))]), 1, experts + redundant),"):
        "every expert is hosted (the constraint above), so there are at least experts >= 1 replicas anyway",
    **_same("placement/planners.py", "exact", "with y <= load x and minimising the busiest GPU, an optimum never sends "
            "an expert more than its tokens: the sum is load_e either way",
            "LinearConstraint(np.hstack([zeros, eye_e, np.zeros((experts, 1))]), w),",
            "LinearConstraint(np.hstack([zeros, eye_e, np.zeros((experts, 1))]), w, ),"),
    ("placement/planners.py", "exact", "cost[-1] = 2.0"): "minimising 2 z has the same minimisers as minimising z",
    **_same("placement/planners.py", "exact", "without the upper bound 1 an integer x above 1 only uses up slots: "
            "y <= load x with sum y = load allows no more tokens than x = 1, so the optimum is the same",
            "bounds = None", "bounds = Bounds(np.zeros(2 * n + 1), )",
            "result = milp(cost, constraints=constraints, integrality=integrality, bounds=None,"),
    ("placement/planners.py", "exact", "hosted = result.x[:n].reshape(experts, gpus) >= 0.5"):
        "x is integral (0 or 1 to the solver's tolerance), never 0.5",
    **_same("placement/dispatch.py", "_sort_short_axis", "both branches sort (odd-even transposition sorts n values "
            "in n rounds); the threshold only picks the faster", "if n >= 4:", "if n > 5:"),
}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {"python": platform.python_version(), **{p: md.version(p) for p in ("mutmut", "pytest", "torch", "numpy")}}


def _copy_repo(dest: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files (the code as it is now, not as committed)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def _failing_tests(cwd: Path, tests: list[str]) -> tuple[int, list[str]]:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests], cwd=cwd,
                         env={"PYTHONPATH": str(cwd), **_env()}, capture_output=True, text=True)
    return run.returncode, sorted(set(re.findall(r"^FAILED (\S+)", run.stdout, flags=re.M)))


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def known(args: argparse.Namespace) -> None:
    """Plant each of issue 18's mutants in a copy of the repository and record the tests that fail on it."""
    results = []
    with tempfile.TemporaryDirectory(prefix="moe-trace-known-") as tmp:
        work = Path(tmp)
        _copy_repo(work)
        for name, path, original, mutant, tests in KNOWN:
            source = (work / path).read_text()
            if source.count(original) != 1:
                sys.exit(f"{path}: expected {original!r} exactly once; update KNOWN to the code")
            (work / path).write_text(source.replace(original, mutant))
            try:
                status, failing = _failing_tests(work, tests)
            finally:
                (work / path).write_text(source)
            results.append(dict(name=name, file=path, original=original, mutant=mutant, tests=tests,
                                pytest_exit_status=status, failing_tests=failing, killed=status == 1 and bool(failing)))
            print(f"{'killed' if results[-1]['killed'] else 'SURVIVED'}: {name}: {len(failing)} failing tests")
    out = RESULTS / "known.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(command="python scripts/mutation_testing.py known", date=_now(),
                                   versions=_versions(), goals={"every known mutant killed": all(
                                       r["killed"] for r in results)}, mutants=results), indent=1) + "\n")
    print(out.relative_to(ROOT))


def run(args: argparse.Namespace) -> None:
    """mutmut on each module in its own copy of the repository; survivors' diffs to ``results/mutation/``."""
    for module in args.modules or list(MODULES):
        if module not in MODULES:
            sys.exit(f"unknown module {module!r}; choose from {', '.join(MODULES)}")
        work = Path(args.workdir) / module.replace("/", "__").removesuffix(".py")
        started = datetime.datetime.now(datetime.timezone.utc)
        out = RESULTS / (module.replace("/", "__").removesuffix(".py") + ".json")
        if not args.collect:
            if args.fresh and work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True, exist_ok=True)
            _copy_repo(work)
            _configure(work / "pyproject.toml", module)
            # After new tests, only the earlier survivors need another run (mutmut keeps every other verdict).
            retest = ([s["name"] for s in json.loads(out.read_text())["survivors"]]
                      if args.retest and out.exists() else [])
            names = retest or args.only
            subprocess.run(["mutmut", "run", "--max-children", str(args.max_children), *names], cwd=work, env=_env(),
                           check=False)
        statuses = _statuses(work)
        earlier = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
        killed_by_new_tests = earlier.get("killed_by_new_tests", []) + [
            s for s in earlier.get("survivors", []) if statuses.get(s["name"]) == "killed"]
        # mutmut still holds replay's kills (``replay``, outside mutmut) as survivors: they stay killed
        replayed = {k["name"] for k in killed_by_new_tests}
        survivors = [dict(name=n, diff=_diff(work, n)) for n, s in statuses.items()
                     if s not in ("killed", "not checked", "timeout") and n not in replayed]
        timeouts = [dict(name=n, diff=_diff(work, n)) for n, s in statuses.items() if s == "timeout"]
        counts: dict[str, int] = {}
        for s in statuses.values():
            counts[s] = counts.get(s, 0) + 1
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(
            module=module, tests=MODULES[module], command=f"python scripts/mutation_testing.py run {module}" + (
                " --only " + " ".join(repr(o) for o in args.only) if args.only else ""),
            date=_now(), wall_s=None if args.collect else round(
                (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()),
            versions=_versions(), counts=counts, killed_by_new_tests=killed_by_new_tests, timeouts=timeouts,
            survivors=[s | {"status": statuses[s["name"]]} for s in survivors]), indent=1) + "\n")
        print(f"{module}: {counts} -> {out.relative_to(ROOT)}")


def replay(args: argparse.Namespace) -> None:
    """Plant each recorded survivor of ``module`` again, by its diff's changed lines, in a copy of today's code and
    run the module's tests: a survivor they now fail on moves to ``killed_by_new_tests``. Unlike ``run --retest``
    this works after the module's code moved on (mutmut renumbers mutants of a changed function), as long as the
    mutated lines are still there; the others are kept as they were, marked ``stale``."""
    out = RESULTS / (args.module.replace("/", "__").removesuffix(".py") + ".json")
    result = json.loads(out.read_text())
    with tempfile.TemporaryDirectory(prefix="moe-trace-replay-") as tmp:
        work = Path(tmp)
        _copy_repo(work)
        source = (work / args.module).read_text()
        still, killed = [], []
        for survivor in result["survivors"]:
            survivor = {k: v for k, v in survivor.items() if k != "stale"}
            if args.open and _key(args.module, survivor) in EQUIVALENT:
                still.append(survivor)
                continue
            planted = _plant(source, survivor["diff"], _key(args.module, survivor)[1])
            if planted is None:
                still.append(survivor | {"stale": True})
                continue
            (work / args.module).write_text(planted)
            try:
                status, failing = _failing_tests(work, (args.tests or MODULES[args.module]) + ["-x"])
            finally:
                (work / args.module).write_text(source)
            if status == 1 and failing:
                killed.append(survivor | {"killed_by": failing})
            else:
                still.append(survivor)
            print(f"{survivor['name']}: {'killed by ' + failing[0] if status == 1 and failing else 'survives'}")
    result.update(survivors=still, killed_by_new_tests=result.get("killed_by_new_tests", []) + killed,
                  replayed=_now())
    out.write_text(json.dumps(result, indent=1) + "\n")


def _plant(source: str, diff: str, function: str) -> str | None:
    """``source`` with a mutant's changed lines replaced, or None where they are not there exactly once in the
    mutated ``function`` (``name`` or ``Class.method``). ``mutmut show`` prints the function dedented to column 0:
    its lines are matched whole, at any indentation, within that function (the same line may be in several)."""
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    begin = 0
    for kind, name in zip(("class", "def")[-len(function.split(".")):] if "." in function else ("def",),
                          function.split("."), strict=True):
        found = re.compile(rf"^([ \t]*){kind} {re.escape(name)}\b", flags=re.M).search(source, begin)
        if found is None or not removed:
            return None
        begin, indent = found.start(), len(found.group(1))
    following = re.compile(rf"^[ \t]{{0,{indent}}}(def|class|async def|@)\b", flags=re.M).search(source, begin + 1)
    end = following.start() if following else len(source)
    body = source[begin:end]
    shift = len(removed[0]) - len(removed[0].lstrip())
    found_lines = re.findall(r"^([ \t]*)" + re.escape(removed[0].lstrip()) + "$", body, flags=re.M)
    if len(found_lines) != 1:
        return None
    pad = " " * (len(found_lines[0]) - shift)
    old, new = ("\n".join(pad + line for line in lines) for lines in (removed, added))
    starts = [m.start() for m in re.finditer("^" + re.escape(old) + "$", body, flags=re.M)]
    if len(starts) != 1:
        return None
    return source[:begin] + body[:starts[0]] + new + body[starts[0] + len(old):] + source[end:]


def _configure(pyproject: Path, module: str) -> None:
    """mutmut's settings for one module: every package importable from its copy, only ``module`` mutated."""
    text = pyproject.read_text()
    text = text[:text.index("[tool.mutmut]")] if "[tool.mutmut]" in text else text
    tests = ", ".join(f'"{t}"' for t in MODULES[module])
    pyproject.write_text(text + f"""
[tool.mutmut]
source_paths = ["moe_trace", "predictors", "placement"]
only_mutate = ["{module}"]
also_copy = ["traces", "notebooks", "benchmarks", "scripts"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
pytest_add_cli_args_test_selection = [{tests}]
process_isolation = "forkserver"
mutate_only_covered_lines = true
do_not_mutate_patterns = ['^\\s*raise ']
""")


def _statuses(work: Path) -> dict[str, str]:
    listing = subprocess.run(["mutmut", "results", "--all", "true"], cwd=work, env=_env(), capture_output=True,
                             text=True, check=True).stdout
    return dict(re.findall(r"^\s+(\S+): (.+)$", listing, flags=re.M))


def _diff(work: Path, name: str) -> str:
    shown = subprocess.run(["mutmut", "show", name], cwd=work, env=_env(), capture_output=True, text=True).stdout
    return "\n".join(line for line in shown.splitlines() if not line.startswith("# "))


def report(args: argparse.Namespace) -> None:
    """The committed report: the known mutants, a summary per module, then each module's counts and its survivors
    with their verdicts."""
    lines = ["# Mutation testing report", "",
             "Written by `python scripts/mutation_testing.py report` from `benchmarks/results/mutation/*.json` (each "
             "names the command that produced it). A survivor is either killed by a test added since the run, "
             "explained as equivalent (it cannot change a result the project reports) or listed as open.", ""]
    known_path = RESULTS / "known.json"
    if known_path.exists():
        known = json.loads(known_path.read_text())
        lines += ["## Issue 18's four mutants", "", f"`{known['command']}`, {known['date']}.", "",
                  "| mutant | change | killed by |", "|---|---|---|"]
        for m in known["mutants"]:
            killers = "<br>".join(f"`{t}`" for t in m["failing_tests"]) or "**survived**"
            lines.append(f"| {m['name']} | `{m['original']}` -> `{m['mutant']}` | {killers} |")
        lines.append("")
    summary = ["## Summary", "", "Survivors of a module's run: killed since by new tests, explained as equivalent, "
               "or open.", "", "| module | mutants | killed | survived | killed since | equivalent | open | "
               "not checked | run time |", "|---|---|---|---|---|---|---|---|---|"]
    details, open_count = [], 0
    for path in sorted(RESULTS.glob("*.json")):
        if path.name == "known.json":
            continue
        result = json.loads(path.read_text())
        module, counts = result["module"], result["counts"]
        killed_since = result.get("killed_by_new_tests", [])
        equivalent = sum(_key(module, s) in EQUIVALENT for s in result["survivors"])
        open_here = len(result["survivors"]) - equivalent
        open_count += open_here
        summary.append(f"| {module} | {sum(counts.values())} | {counts.get('killed', 0)} | "
                       f"{len(result['survivors']) + len(killed_since)} | {len(killed_since)} | {equivalent} | "
                       f"{open_here} | {counts.get('not checked', 0)} | "
                       f"{_run_time(result)} |")
        details += _module_section(module, result)
    not_run = [m for m in MODULES if not (RESULTS / (m.replace("/", "__").removesuffix(".py") + ".json")).exists()]
    summary += ["", f"Open survivors: {open_count}." + (f" Not run yet: {', '.join(not_run)}." if not_run else ""), ""]
    REPORT.write_text("\n".join(lines + summary + details))
    print(REPORT.relative_to(ROOT), f"({open_count} open)")


def _run_time(result: dict) -> str:
    return f"{result['wall_s']} s" if result["wall_s"] else "stopped (not measured)"


def _module_section(module: str, result: dict) -> list[str]:
    counts = result["counts"]
    when = ", ".join([result["date"], *([f"{result['wall_s']} s"] if result["wall_s"] else []),
                      *([f"{counts['not checked']} mutants not checked"] if counts.get("not checked") else [])])
    verdicts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    lines = [f"## {module}", "", f"`{result['command']}` against {', '.join(result['tests'])} ({when}): "
             f"{verdicts}.", ""]
    if result.get("killed_by_new_tests"):
        lines += ["Survivors of the first run that tests added since kill:", ""]
        lines += [f"- `{k['name']}`: `{_key(module, k)[2]}`" + (f" (killed by `{k['killed_by'][0]}`)"
                                                                  if k.get("killed_by") else "")
                  for k in result["killed_by_new_tests"]] + [""]
    if result.get("timeouts"):
        lines += ["Timeouts (the tests ran 15x longer than without the mutant: a hang the suite would report, or, "
                  "on a loaded machine, possibly a slow run of a survivor):", ""]
        lines += [f"- `{t['name']}`: `{_key(module, t)[2]}`" for t in result["timeouts"]] + [""]
    for survivor in result["survivors"]:
        why = EQUIVALENT.get(_key(module, survivor))
        verdict = f"equivalent: {why}" if why else "**open**"
        if survivor.get("stale"):
            verdict += " (not replayed: its lines are ambiguous or changed since; rerun the module)"
        lines += [f"- `{survivor['name']}` ({survivor['status']}): {verdict}", "", "```diff",
                  survivor["diff"].strip(), "```", ""]
    return lines


def _key(module: str, survivor: dict) -> tuple[str, str, str]:
    # mutmut names a mutant ``package.module.x_function__mutmut_N`` or ``...xǁClassǁmethod__mutmut_N``
    package = module.removesuffix(".py").replace("/", ".") + "."
    mangled = survivor["name"].rsplit("__mutmut_", 1)[0].removeprefix(package)
    function = mangled.removeprefix("x_").removeprefix("xǁ").replace("ǁ", ".")
    added = [line[1:].strip() for line in survivor["diff"].splitlines()
             if line.startswith("+") and not line.startswith("+++")]
    return module, function, added[0] if added else ""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("known", help="issue 18's four mutants: each must fail the suite").set_defaults(func=known)
    run_parser = sub.add_parser("run", help="mutmut on modules (default: all) against their tests")
    run_parser.add_argument("modules", nargs="*", help=f"any of {', '.join(MODULES)}")
    run_parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "moe-trace-mutation"),
                            help="where each module's copy and mutmut's results live (kept between runs)")
    run_parser.add_argument("--max-children", type=int, default=1, help="mutants tested in parallel")
    run_parser.add_argument("--fresh", action="store_true", help="forget earlier results of these modules")
    run_parser.add_argument("--collect", action="store_true",
                            help="only gather the verdicts so far from --workdir (e.g. of a run still going)")
    run_parser.add_argument("--retest", action="store_true",
                            help="run only the survivors of the last run again (after adding tests)")
    run_parser.add_argument("--only", nargs="+", default=[], metavar="PATTERN",
                            help="only the mutants whose names match (mutmut's globs, e.g. 'predictors.evaluate."
                                 "x_step_wape*'): the functions that produce reported figures first")
    run_parser.set_defaults(func=run)
    replay_parser = sub.add_parser("replay", help="plant a module's recorded survivors in today's code again")
    replay_parser.add_argument("module", choices=list(MODULES))
    replay_parser.add_argument("--tests", nargs="+", help="pytest arguments instead of the module's test files "
                               "(a narrower selection is faster; a mutant it kills is killed)")
    replay_parser.add_argument("--open", action="store_true",
                               help="only the survivors not explained as equivalent (the others stay as they are)")
    replay_parser.set_defaults(func=replay)
    sub.add_parser("report", help="write benchmarks/results/mutation_report.md").set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
