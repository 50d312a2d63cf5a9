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
