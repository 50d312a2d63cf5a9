import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_trace import trace
from moe_trace.trace import TraceError


def _meta(layers=(1, 3), experts=4, **kw):
    fields = dict(model="gpt-tiny-moe", num_experts=experts, top_k=1, moe_layers=list(layers),
                  tokens_per_step=64, seq_len=16, global_batch=4, seed=0, moe_backend="torch",
                  attention="sdpa", world_size=1)
    fields.update(kw)
    return trace.make_meta(**fields)


def _counts(steps, layers=2, experts=4, tokens=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.multinomial(tokens, np.full(experts, 1 / experts), size=(steps, layers))


def test_round_trip_parts_in_any_order(tmp_path):
    meta, counts = _meta(), _counts(30)
    trace.write_part(tmp_path, np.arange(10, 30), counts[10:], meta)
    trace.write_part(tmp_path, np.arange(0, 10), counts[:10], meta)
    t = trace.load(tmp_path)
    np.testing.assert_array_equal(t.counts, counts)
    np.testing.assert_array_equal(t.steps, np.arange(30))
    assert t.layers == [1, 3] and t.meta["num_experts"] == 4
    np.testing.assert_allclose(t.proportions().sum(axis=2), 1.0)


def test_single_file_and_run_directory(tmp_path):
    counts = _counts(5)
    trace.write(tmp_path / "one.parquet", counts, _meta())
    np.testing.assert_array_equal(trace.load(tmp_path / "one.parquet").counts, counts)
    trace.write(tmp_path / "run" / "trace", counts, _meta())
    np.testing.assert_array_equal(trace.load(tmp_path / "run").counts, counts)


def test_truncate_then_append_holds_each_step_once(tmp_path):
    meta, counts = _meta(), _counts(30)
    trace.write_part(tmp_path, np.arange(0, 20), counts[:20], meta)
    trace.write_part(tmp_path, np.arange(20, 30), counts[20:], meta)
    trace.truncate(tmp_path, 15)
    assert len(trace.load(tmp_path)) == 15
    trace.write_part(tmp_path, np.arange(15, 30), counts[15:], meta)
    np.testing.assert_array_equal(trace.load(tmp_path).counts, counts)


def test_superseded_parts_are_ignored_and_compact_merges(tmp_path):
    meta, counts = _meta(), _counts(20)
    trace.write_part(tmp_path, np.arange(0, 10), counts[:10], meta)
    trace.write_part(tmp_path, np.arange(10, 20), counts[10:], meta)
    # an interrupted merge leaves the merged part beside the parts it covers
    trace.write_part(tmp_path, np.arange(0, 20), counts, meta)
    np.testing.assert_array_equal(trace.load(tmp_path).counts, counts)
    trace.compact(tmp_path)
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1
    np.testing.assert_array_equal(trace.load(tmp_path).counts, counts)


def test_duplicate_step_is_rejected(tmp_path):
    meta, counts = _meta(), _counts(10)
    trace.write_part(tmp_path, np.arange(0, 6), counts[:6], meta)
    trace.write_part(tmp_path, np.arange(5, 10), counts[5:], meta)
    with pytest.raises(TraceError, match=r"step 5 is in both .*part-0000000000-0000000005\.parquet and "
                                         r".*part-0000000005-0000000009\.parquet"):
        trace.load(tmp_path)


def _foreign_part(path, steps, counts, meta):
    """A part written by plain pyarrow, as another tool would: any name, the moe_trace metadata, rows in any order."""
    layers = np.asarray(meta["moe_layers"], dtype=np.int32)
    table = pa.table({"step": np.repeat(steps, len(layers)).astype(np.int64), "layer": np.tile(layers, len(steps)),
                      "counts": [row.tolist() for row in counts.reshape(-1, counts.shape[2])]})
    table = table.replace_schema_metadata({"moe_trace": json.dumps(meta)})
    pq.write_table(table.take(np.random.default_rng(0).permutation(len(table))), path)


def test_foreign_part_files_are_ordered_by_step_not_name(tmp_path):
    meta, counts = _meta(), _counts(12)
    _foreign_part(tmp_path / "part-00000.parquet", np.arange(6, 12), counts[6:], meta)  # later steps, first name
    _foreign_part(tmp_path / "part-00001.parquet", np.arange(0, 6), counts[:6], meta)
    (tmp_path / "metrics.parquet").write_bytes(b"not a part")  # a sidecar, never read as a part
    t = trace.load(tmp_path)
    assert t.steps.tolist() == list(range(12))
    np.testing.assert_array_equal(t.counts, counts)
    assert trace.read_meta(tmp_path)["moe_layers"] == [1, 3]


def test_foreign_part_beside_own_parts_and_compact_keeps_it(tmp_path):
    meta, counts = _meta(), _counts(12)
    trace.write_part(tmp_path, np.arange(0, 4), counts[:4], meta)
    trace.write_part(tmp_path, np.arange(4, 8), counts[4:8], meta)
    _foreign_part(tmp_path / "part-0.parquet", np.arange(8, 12), counts[8:], meta)
    trace.compact(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-0.parquet", "part-0000000000-0000000007.parquet"]
    np.testing.assert_array_equal(trace.load(tmp_path).counts, counts)


def test_overlapping_foreign_parts_name_both_files(tmp_path):
    meta, counts = _meta(), _counts(10)
    _foreign_part(tmp_path / "a.parquet", np.arange(0, 6), counts[:6], meta)
    _foreign_part(tmp_path / "b.parquet", np.arange(5, 10), counts[5:], meta)
    with pytest.raises(TraceError, match=r"step 5 is in both .*a\.parquet and .*b\.parquet"):
        trace.load(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "foreign", "schema2"])
def test_damaged_or_foreign_files_are_rejected(tmp_path, damage):
    path = tmp_path / "t.parquet"
    if damage == "garbage":
        path.write_bytes(b"PAR1 not really parquet")
    elif damage == "foreign":
        import pandas as pd
        pd.DataFrame({"step": [0], "x": [1]}).to_parquet(path)
    else:
        trace.write(path, _counts(3), _meta())
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"moe_trace"]) | {"schema": 2}
        pq.write_table(table.replace_schema_metadata({b"moe_trace": json.dumps(meta)}), path)
    with pytest.raises(TraceError):
        trace.load(path)


def test_missing_path(tmp_path):
    with pytest.raises(TraceError, match="no trace"):
        trace.load(tmp_path / "nope")


def test_readable_by_pandas_pyarrow_duckdb_polars(tmp_path):
    counts = _counts(12)
    trace.write(tmp_path, counts, _meta())
    import pandas as pd
    df = pd.read_parquet(tmp_path)
    assert len(df) == 24 and df["counts"].map(sum).eq(64).all()
    assert pq.read_table(tmp_path).num_rows == 24
    duckdb = pytest.importorskip("duckdb")
    sums = duckdb.sql(f"SELECT sum(list_sum(counts)) FROM '{tmp_path}/part-*.parquet'").fetchall()[0][0]
    assert sums == counts.sum()
    pl = pytest.importorskip("polars")
    assert pl.read_parquet(os.path.join(tmp_path, "*.parquet"))["layer"].unique().sort().to_list() == [1, 3]


def test_metrics_round_trip(tmp_path):
    cols = {c: np.arange(3) for c in trace.METRIC_COLUMNS}
    trace.write(tmp_path / "trace", _counts(3), _meta())
    trace.write_metrics(tmp_path / "metrics.parquet", cols)
    got = trace.load_metrics(tmp_path / "trace")
    np.testing.assert_array_equal(got["loss"], [0.0, 1.0, 2.0])


def test_dropped_column_round_trips_through_parts_compaction_and_truncation(tmp_path):
    meta, counts = _meta(), _counts(30)
    dropped = counts // 3
    trace.write_part(tmp_path, np.arange(10, 30), counts[10:], meta, dropped[10:])
    trace.write_part(tmp_path, np.arange(0, 10), counts[:10], meta, dropped[:10])
    np.testing.assert_array_equal(trace.load(tmp_path).dropped, dropped)
    trace.truncate(tmp_path, 25)
    trace.compact(tmp_path)
    t = trace.load(tmp_path)
    np.testing.assert_array_equal(t.counts, counts[:25])
    np.testing.assert_array_equal(t.dropped, dropped[:25])
    assert pq.read_table(next(tmp_path.glob("part-*.parquet"))).column_names == ["step", "layer", "counts",
                                                                                 "dropped"]
    trace.write(tmp_path / "one.parquet", counts, meta, dropped=dropped)
    np.testing.assert_array_equal(trace.load(tmp_path / "one.parquet").dropped, dropped)


def test_dropped_column_is_optional_and_checked(tmp_path):
    meta, counts = _meta(), _counts(10)
    trace.write_part(tmp_path / "plain", np.arange(10), counts, meta)
    assert trace.load(tmp_path / "plain").dropped is None
    with pytest.raises(ValueError, match="between 0 and the counts"):
        trace.write_part(tmp_path / "bad", np.arange(10), counts, meta, counts + 1)
    trace.write_part(tmp_path / "plain", np.arange(10, 20), counts, meta, counts // 2)
    with pytest.raises(TraceError, match="some parts have a 'dropped' column"):
        trace.load(tmp_path / "plain")


def test_proportions_by_hand():
    loads = np.array([[[3, 1, 0, 0], [1, 0, 0, 0]], [[0, 0, 0, 0], [2, 2, 2, 2]]])  # [steps, layers=2, experts=4]
    np.testing.assert_array_equal(trace.proportions(loads), [[[0.75, 0.25, 0, 0], [1, 0, 0, 0]],
                                                             [[0.25] * 4, [0.25] * 4]])  # no tokens: uniform


def test_edge_shapes_round_trip_with_their_types(tmp_path):
    # one MoE layer (block 0) and one expert; given steps; int32 counts; everything dropped at one step
    counts = np.array([[[5]], [[7]], [[0]]], dtype=np.int32)
    meta = _meta(layers=[0], experts=1)
    for path in (tmp_path / "dir", tmp_path / "new" / "nested" / "one.parquet"):
        trace.write(path, counts, meta, steps=[10, 20, 25], dropped=counts.copy())
        loaded = trace.load(path)
        assert loaded.steps.tolist() == [10, 20, 25] and loaded.counts[:, 0, 0].tolist() == [5, 7, 0]
        assert loaded.steps.dtype == loaded.counts.dtype == loaded.dropped.dtype == np.int64
        np.testing.assert_array_equal(loaded.dropped, counts)
    two = trace.write(tmp_path / "two", _counts(3), _meta(layers=(0, 1)))  # consecutive block ids from 0
    np.testing.assert_array_equal(trace.load(two).counts, _counts(3))
    assert trace.make_meta(**{**meta, "moe_layers": np.array([0, 2])})["moe_layers"] == [0, 2]  # plain ints


@pytest.mark.parametrize(("steps", "counts", "dropped"), [
    ([0, 1], np.zeros((2, 2)), None),  # not [steps, layers, experts]
    ([0, 1, 2], np.zeros((2, 2, 4)), None),  # more steps than rows
    ([], np.zeros((0, 2, 4)), None),  # nothing to write
    ([0, 1], np.zeros((2, 3, 4)), None),  # three layers, the metadata names two
    ([0, 1], np.zeros((2, 2, 5)), None),  # five experts, the metadata says four
    ([0, 0], np.zeros((2, 2, 4)), None),  # a step twice
    ([0, 1], np.ones((2, 2, 4)), np.full((2, 2, 4), 2)),  # more dropped than counted
    ([0, 1], np.ones((2, 2, 4)), -np.ones((2, 2, 4))),
])
def test_writing_what_the_metadata_does_not_describe_is_refused(tmp_path, steps, counts, dropped):
    with pytest.raises(ValueError):
        trace.write_part(tmp_path, np.asarray(steps), counts, _meta(), dropped)
    assert not list(tmp_path.glob("*.parquet"))


def test_truncate_at_a_part_boundary_and_inside_a_part(tmp_path):
    meta, counts = _meta(), _counts(12)
    for first, last in ((0, 3), (4, 7), (8, 11)):
        trace.write_part(tmp_path, np.arange(first, last + 1), counts[first:last + 1], meta)
    (tmp_path / ".part-0000000012-0000000013.parquet.99.tmp").write_bytes(b"half a part, left by a kill")
    trace.truncate(tmp_path, 8)  # the third part starts there: it goes
    assert trace.load(tmp_path).steps.tolist() == list(range(8))
    assert not list(tmp_path.glob(".part-*.tmp"))
    trace.truncate(tmp_path, 7)  # the last step of the second part
    np.testing.assert_array_equal(trace.load(tmp_path).counts, counts[:7])


def test_parts_after_a_superseded_one_are_read(tmp_path):
    meta, counts = _meta(), _counts(15)
    trace.write_part(tmp_path, np.arange(0, 10), counts[:10], meta)  # a merge of 0..9 completed
    trace.write_part(tmp_path, np.arange(0, 5), counts[:5], meta)  # ... before its input 0..4 was unlinked
    trace.write_part(tmp_path, np.arange(10, 15), counts[10:], meta)
    np.testing.assert_array_equal(trace.load(tmp_path).counts, counts)


def _rows(path, meta, rows):
    """A part written row by row: (step, layer, counts)."""
    table = pa.table({"step": pa.array([r[0] for r in rows], pa.int64()), "layer": pa.array([r[1] for r in rows],
                      pa.int32()), "counts": pa.array([r[2] for r in rows], pa.list_(pa.int64()))})
    pq.write_table(table.replace_schema_metadata({b"moe_trace": json.dumps(meta)}), path)


@pytest.mark.parametrize("rows", [
    [(0, 1, [1, 1, 1, 1]), (0, 99, [1, 1, 1, 1])],  # a block beyond any MoE layer
    [(0, 1, [1, 1, 1, 1]), (0, 2, [1, 1, 1, 1])],  # a block that is not a MoE layer
    [(0, 1, [1, 1, 1, 1]), (0, -1, [1, 1, 1, 1])],
    [(0, 1, [1, 1, 1, 1]), (0, 4, [1, 1, 1, 1])],  # the first block past the last MoE layer
    [(0, 1, [1, 1, 1, 1]), (0, 1, [1, 1, 1, 1]), (0, 3, [1, 1, 1, 1])],  # a layer twice
    [(0, 1, [1, 1, 1, 1]), (1, 3, [1, 1, 1, 1])],  # steps missing a layer's row
    [(0, 1, [1, 1, 1, 1]), (0, 3, [1, 1, 1])],  # three experts' counts, the metadata says four
])
def test_rows_that_do_not_fit_the_metadata_are_refused(tmp_path, rows):
    _rows(tmp_path / "t.parquet", _meta(), rows)
    with pytest.raises(TraceError, match=r"t\.parquet"):
        trace.load(tmp_path / "t.parquet")


def test_metadata_and_metrics_lacking_a_key_are_refused(tmp_path):
    meta = {k: v for k, v in _meta().items() if k != "seed"}
    _rows(tmp_path / "t.parquet", meta, [(0, 1, [1, 1, 1, 1]), (0, 3, [1, 1, 1, 1])])
    with pytest.raises(TraceError, match=r"t\.parquet metadata lacks seed"):
        trace.load(tmp_path / "t.parquet")
    with pytest.raises(TraceError, match=r"t\.parquet metadata lacks seed"):
        trace.read_meta(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="lacks seed"):
        trace.make_meta(**meta)
    with pytest.raises(ValueError, match="lack tokens"):
        trace.write_metrics(tmp_path / "metrics.parquet", {c: [1] for c in trace.METRIC_COLUMNS[:-1]})
    pq.write_table(pa.table({"step": [0], "loss": [1.0]}), tmp_path / "metrics.parquet")
    with pytest.raises(TraceError, match="lacks the columns"):
        trace.load_metrics(tmp_path / "metrics.parquet")


def test_metrics_are_found_from_the_trace_however_it_is_named(tmp_path):
    columns = {c: [0, 1] for c in trace.METRIC_COLUMNS}
    trace.write_metrics(tmp_path / "run" / "deeper" / "metrics.parquet", columns)
    trace.write(tmp_path / "run" / "deeper" / "trace", _counts(2), _meta())
    trace.write(tmp_path / "run" / "deeper" / "one.parquet", _counts(2), _meta())
    for name in ("metrics.parquet", "trace", "one.parquet", "."):
        assert trace.load_metrics(tmp_path / "run" / "deeper" / name)["step"].tolist() == [0, 1], name


def test_one_layer_of_consecutive_steps_round_trips(tmp_path):
    counts = _counts(4, layers=1)
    np.testing.assert_array_equal(trace.load(trace.write(tmp_path / "t", counts, _meta(layers=[2]))).counts, counts)


def test_two_files_holding_one_last_step_are_refused_naming_both(tmp_path):
    for name in ("a.parquet", "b.parquet"):
        _rows(tmp_path / name, _meta(), [(5, 1, [1, 1, 1, 1]), (5, 3, [1, 1, 1, 1])])
    with pytest.raises(TraceError, match=r"step 5 is in both .*a\.parquet and .*b\.parquet"):
        trace.load(tmp_path)


@pytest.mark.parametrize("dropped", [[-1, 0, 0, 0], [2, 0, 0, 0]])
def test_read_dropped_outside_zero_to_counts_is_refused(tmp_path, dropped):
    table = pa.table({"step": pa.array([0, 0], pa.int64()), "layer": pa.array([1, 3], pa.int32()),
                      "counts": pa.array([[1, 1, 1, 1]] * 2, pa.list_(pa.int64())),
                      "dropped": pa.array([dropped, [0, 0, 0, 0]], pa.list_(pa.int64()))})
    pq.write_table(table.replace_schema_metadata({b"moe_trace": json.dumps(_meta())}), tmp_path / "t.parquet")
    with pytest.raises(TraceError, match="dropped assignments outside"):
        trace.load(tmp_path / "t.parquet")
