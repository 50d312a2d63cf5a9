"""moe_trace.synth: conservation, the known switch, overdispersion, round trip through the trace format."""

import numpy as np
import pytest

from moe_trace import synth, trace


def test_counts_conserve_tokens_times_top_k_and_round_trip(tmp_path):
    counts, meta = synth.generate(layers=3, experts=8, steps=300, tokens_per_step=1024, top_k=2, seq_len=128)
    assert counts.shape == (300, 3, 8) and counts.dtype == np.int64 and (counts >= 0).all()
    assert (counts.sum(axis=2) == 1024 * 2).all()
    loaded = trace.load(trace.write(tmp_path / "t", counts, meta))
    np.testing.assert_array_equal(loaded.counts, counts)
    assert loaded.meta["model"] == "synthetic" and loaded.meta["synthetic"]["switch_step"] == 2000


def test_same_seed_same_trace_other_seed_other_trace():
    a, _ = synth.generate(steps=50, seed=7)
    b, _ = synth.generate(steps=50, seed=7)
    c, _ = synth.generate(steps=50, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_mean_is_constant_from_the_switch_and_moves_before():
    mean = synth.mean_proportions(layers=2, experts=6, steps=1000, switch_step=400, rng=np.random.default_rng(0))
    np.testing.assert_allclose(mean.sum(axis=2), 1.0)
    np.testing.assert_allclose(mean[400:], np.broadcast_to(mean[400], mean[400:].shape))
    assert np.abs(np.diff(mean[:400], axis=0)).sum(axis=2).min() > 0


def test_per_sequence_correlation_inflates_variance_as_the_dirichlet_multinomial_says():
    rng = np.random.default_rng(1)
    mean = np.full((20000, 1, 4), 0.25)
    tokens, seq_len, alpha = 4096, 512, 10.0
    counts = synth.sample_counts(mean, tokens_per_step=tokens, seq_len=seq_len, seq_concentration=alpha, rng=rng)
    multinomial_var = tokens * 0.25 * 0.75
    expected = multinomial_var * (seq_len + alpha) / (1 + alpha)  # S sequences of DirMult(seq_len, alpha p)
    np.testing.assert_allclose(counts.var(axis=0), expected, rtol=0.05)
    np.testing.assert_allclose(counts.mean(axis=0), tokens / 4, rtol=0.01)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        synth.generate(experts=4, top_k=5)
