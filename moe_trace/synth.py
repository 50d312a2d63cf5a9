"""Synthetic expert-load traces with a known transient/stable switch (numpy only).

The model behind a trace, per MoE layer:

* a *stable* mean load ``mu[l]`` drawn from a symmetric Dirichlet (``concentration``: small = skewed);
* before ``switch_step`` the mean wanders: in logit space it is ``log mu + (1 - t/switch) d0 + ou(t)``, a
  deviation ``d0`` (std ``fade``, default ``drift``) that fades linearly plus an Ornstein-Uhlenbeck
  excursion (std ``drift``, correlation time ``drift_timescale`` steps) that stops at the switch. From
  ``switch_step`` on the mean is ``mu``;
* per-step counts: tokens arrive in sequences of ``seq_len`` that share a routing preference
  ``q ~ Dirichlet(seq_concentration * p)``, so counts are overdispersed relative to a multinomial, as the
  per-step noise of real small-batch traces is (ANCHORS.md: ~16-20 % step error at 16k tokens).

A token routed to ``top_k`` experts adds one count to each, so every step sums to
``tokens_per_step * top_k``; the top-k experts are drawn with replacement (a token may hit one twice),
which keeps the draw a multinomial.
"""

from __future__ import annotations

import numpy as np

from moe_trace import trace


def mean_proportions(*, layers: int = 4, experts: int = 16, steps: int = 6000, switch_step: int | None = 2000,
                     concentration: float = 5.0, drift: float = 0.5, drift_timescale: float = 300.0,
                     fade: float | None = None, rng: np.random.Generator) -> np.ndarray:
    """The noiseless mean load ``[steps, layers, experts]`` (rows sum to 1); ``switch_step=None``: no transient."""
    stable = rng.dirichlet(np.full(experts, concentration), size=layers)  # [layers, experts]
    logits = np.broadcast_to(np.log(np.maximum(stable, 1e-12)), (steps, layers, experts)).copy()
    n_transient = 0 if switch_step is None else min(int(switch_step), steps)
    fade = drift if fade is None else fade
    if n_transient > 0:
        t = np.arange(n_transient)[:, None, None]
        fading = (1.0 - t / n_transient) * rng.normal(0.0, fade, size=(layers, experts))
        logits[:n_transient] += fading + _ornstein_uhlenbeck(n_transient, (layers, experts), drift,
                                                             drift_timescale, rng)
    logits -= logits.max(axis=2, keepdims=True)
    mean = np.exp(logits)
    return mean / mean.sum(axis=2, keepdims=True)


def _ornstein_uhlenbeck(steps: int, shape: tuple[int, ...], std: float, timescale: float,
                        rng: np.random.Generator) -> np.ndarray:
    """A stationary AR(1) path ``[steps, *shape]`` with marginal std ``std`` and correlation time ``timescale``."""
    from scipy.signal import lfilter  # here, not at the top: scipy.signal takes a second to import

    a = np.exp(-1.0 / max(timescale, 1e-9))
    shocks = rng.normal(0.0, std * np.sqrt(1.0 - a * a), size=(steps, *shape))
    shocks[0] = rng.normal(0.0, std, size=shape)  # start in the stationary distribution
    return lfilter([1.0], [1.0, -a], shocks, axis=0)


def sample_counts(mean: np.ndarray, *, tokens_per_step: int = 16384, top_k: int = 1, seq_len: int = 2048,
                  seq_concentration: float = 30.0, rng: np.random.Generator) -> np.ndarray:
    """Draw int64 counts ``[steps, layers, experts]`` around ``mean`` with per-sequence correlated routing.

    The sum over ``S = tokens_per_step / seq_len`` sequences of Dirichlet-multinomials with ``m = seq_len *
    top_k`` draws each is replaced by one Dirichlet-multinomial over all ``N = S m`` draws whose
    concentration gives the same mean and covariance: both have overdispersion ``(m + a) / (1 + a)``.
    That keeps the draw one vectorised gamma + multinomial per (step, layer) at any scale.
    """
    n_draws = int(tokens_per_step) * int(top_k)
    per_sequence = min(int(seq_len), int(tokens_per_step)) * int(top_k)
    overdispersion = (per_sequence + seq_concentration) / (1.0 + seq_concentration)
    if overdispersion <= 1.0 + 1e-12 or n_draws <= overdispersion:
        pvals = mean
    else:
        alpha = (n_draws - overdispersion) / (overdispersion - 1.0)
        gammas = rng.standard_gamma(np.maximum(alpha * mean, 1e-12))
        pvals = gammas / gammas.sum(axis=-1, keepdims=True)
    return rng.multinomial(n_draws, pvals).astype(np.int64)


def generate(*, layers: int = 4, experts: int = 16, steps: int = 6000, tokens_per_step: int = 16384,
             top_k: int = 1, seq_len: int = 2048, switch_step: int | None = 2000, concentration: float = 5.0,
             drift: float = 0.5, drift_timescale: float = 300.0, fade: float | None = None,
             seq_concentration: float = 30.0, seed: int = 0) -> tuple[np.ndarray, dict]:
    """A synthetic trace: int64 counts ``[steps, layers, experts]`` and schema-1 metadata (model "synthetic").

    The generator's parameters are kept in the metadata under ``synthetic`` so a trace documents its truth.
    """
    if min(layers, experts, steps, tokens_per_step, top_k, seq_len) < 1 or top_k > experts:
        raise ValueError("layers, experts, steps, tokens_per_step, top_k, seq_len must be >= 1, top_k <= experts")
    rng = np.random.default_rng(seed)
    mean = mean_proportions(layers=layers, experts=experts, steps=steps, switch_step=switch_step,
                            concentration=concentration, drift=drift, drift_timescale=drift_timescale, fade=fade,
                            rng=rng)
    counts = sample_counts(mean, tokens_per_step=tokens_per_step, top_k=top_k, seq_len=seq_len,
                           seq_concentration=seq_concentration, rng=rng)
    meta = trace.make_meta(
        model="synthetic", num_experts=experts, top_k=top_k, moe_layers=list(range(1, 2 * layers, 2)),
        tokens_per_step=tokens_per_step, seq_len=seq_len, global_batch=max(1, tokens_per_step // seq_len),
        seed=seed, moe_backend="synthetic", attention="none", world_size=1,
        synthetic=dict(switch_step=switch_step, concentration=concentration, drift=drift,
                       drift_timescale=drift_timescale, fade=fade, seq_concentration=seq_concentration),
    )
    return counts, meta
