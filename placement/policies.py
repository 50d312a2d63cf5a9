"""Re-planning policies: *when* to change the placement, and from which load estimate.

A policy turns a trace into a schedule: a list of ``(step, plan)``, the first at step 0, each plan in force
from its step until the next one. Policies other than the oracle read only the steps before a re-plan.

* ``static`` -- the contiguous plan forever (megablocks).
* ``history`` -- EPLB: every ``every`` steps (1000), plan on the mean load of the last ``window`` (1000).
* ``predict`` -- every ``every`` steps (50), plan on a predictor's forecast of the next ``every`` steps.
* ``phase`` -- phase-aware: check often (``transient_every``) while loads move and rarely
  (``stable_every``) once they settle, forecasting with a short-memory predictor in the transient phase and
  a long window in the stable one. The transient forecaster is chosen per layer among
  ``transient_predictors`` (EMAs of half-life 25 and 10 steps) by the recent backtest error of their interval
  forecasts (:func:`backtest_choice`), so each layer gets the memory its noise supports: a short one where the
  load moves faster than the per-step noise hides it, the longer one where the noise dominates (few tokens per
  step). A layer is re-planned only when the forecast gain over the next
  ``payback`` steps (200, or the check interval if longer) exceeds its migration stall. Two candidates per
  check: one planned on the forecast mean, one on mean + ``tail_z`` x per-step std (:func:`step_noise`),
  which gives noisy experts the replicas that absorb their busy steps (the p99); the replay picks. The phase
  is decided online by :func:`stable_layers` from the recent history alone, with the movement statistic of
  ``predictors.phases`` (whose change-point split needs the whole trace, which a running job lacks).
* ``oracle`` -- hindsight: every ``every`` steps (50), plan on the actual mean load (and on mean + ``tail_z``
  x per-step std, as ``phase`` does) of the next 50 and of the next 1000 steps, and per layer keep whichever
  of these and the current plan makes the next 50 steps fastest, migration included. What knowing the future
  buys at that cadence, chosen greedily. It is not a lower bound on any figure: a move must repay its full
  migration stall within the next 50 steps, so it moves rarely, and a policy that checks more often or lets a
  move pay back over longer can beat it (on ``traces/gpt-125m-moe``, 8 GPUs, ``phase`` has mean imbalance
  1.061 to its 1.077 and a lower estimated step time). What holds: each of its re-plans replays its next 50
  steps no slower than the plan it replaces, and it beats ``static`` and ``history`` (tests/test_simulate.py).
  The bound no placement can beat is ``placement.bounds``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from placement import planners
from placement.cost import CostModel
from placement.dispatch import gpu_tokens
from placement.migration import align, arrivals
from placement.planners import PlacementError, Plan

Schedule = list[tuple[int, Plan]]
CHECKS_PER_BATCH = 64  # re-plan checks whose candidate plans are made and replayed together
DISPATCH_ROWS = 1 << 15  # steps x layers per dispatch call when candidate replays are batched


@dataclass(frozen=True)
class Setting:
    """The cluster a trace is replayed on and how plans are made and dispatched."""

    gpus: int
    redundant: int
    cost: CostModel
    planner: str = "eplb"
    dispatch: str = "balanced"
    slots_per_gpu: int | None = None
    tail_z: float = 1.0  # plan on mean + tail_z * per-step std of each expert's load (0: on the mean alone)

    def plan(self, loads: np.ndarray, previous: Plan | None = None, noise: np.ndarray | None = None) -> Plan:
        """A plan for ``loads[layers, experts]`` (per-step std ``noise``, same shape), GPU-renumbered to move as
        little as possible from ``previous``."""
        new = planners.plan(self._tail(loads, noise), self.gpus, self.slots_per_gpu, self.redundant,
                            method=self.planner)
        return new if previous is None else align(previous, new)

    def plan_many(self, loads: np.ndarray, noise: np.ndarray | None = None) -> list[Plan]:
        """Plans for ``loads[n, layers, experts]`` in one vectorised planner call (not yet aligned)."""
        n, layers, experts = loads.shape
        if n == 0:
            return []
        flat = planners.plan(self._tail(loads, noise).reshape(n * layers, experts), self.gpus, self.slots_per_gpu,
                             self.redundant, method=self.planner)
        return planners.unstack(flat, layers)

    def _tail(self, loads: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        """The load to plan for: replicas absorb an expert's per-step noise only if they are planned for it, so
        noisy experts weigh more than their mean (their busy steps set the p99)."""
        return loads if noise is None or self.tail_z == 0 else loads + self.tail_z * noise

    def initial(self, layers: int, experts: int) -> Plan:
        """The plan a job starts with before it has seen any load: contiguous."""
        slots = self.slots_per_gpu or planners.slots_per_gpu_for(experts, self.gpus, self.redundant)
        return planners.contiguous(np.ones((layers, experts)), self.gpus, slots, self.redundant)


def step_noise(history: np.ndarray) -> np.ndarray:
    """Per-step std of each expert's load over ``history[steps, layers, experts]``, from successive differences
    (``std(x[t] - x[t-1]) / sqrt 2``) so that a drifting mean does not count as noise; zeros under two steps."""
    return window_step_noise(history, [0], [len(history)])[0]


def window_step_noise(series: np.ndarray, starts: Sequence[int], stops: Sequence[int]) -> np.ndarray:
    """:func:`step_noise` of ``series[start: stop]`` for every window at once: float64 ``[windows, ...]``.

    One pass over the series however much the windows overlap: the successive differences are cut into blocks
    at every window's ends, each block keeps its count, sum and sum of squared deviations from its own mean, and
    a window's variance combines its blocks' (Chan et al.), which is as accurate as two passes over the window
    (a constant stretch gives exactly zero).
    """
    starts, stops = np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64)
    last_diff = np.maximum(stops - 1, starts)  # window [a, b) has the differences d[a: b - 1], d[i] = x[i+1] - x[i]
    cuts = np.unique(np.concatenate([starts, last_diff]))
    size = np.diff(cuts).reshape(-1, *[1] * (series.ndim - 1))
    sums, squares = np.empty((2, len(size), *series.shape[1:]))
    for i, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        d = series[lo + 1: hi + 1] - series[lo: hi]
        sums[i] = d.sum(axis=0)
        squares[i] = ((d - sums[i] / (hi - lo)) ** 2).sum(axis=0)
    noise = np.zeros((len(starts), *series.shape[1:]))
    for w, (first, end) in enumerate(zip(np.searchsorted(cuts, starts), np.searchsorted(cuts, last_diff),
                                         strict=True)):
        if end > first:
            n, block = size[first: end].sum(), slice(first, end)
            mean = sums[block].sum(axis=0) / n
            spread = squares[block].sum(axis=0) + (size[block] * (sums[block] / size[block] - mean) ** 2).sum(axis=0)
            noise[w] = np.sqrt(spread / n) / np.sqrt(2.0)
    return noise


def _predict_mean(spec: str, history: np.ndarray, horizon: int) -> np.ndarray:
    import predictors

    return predictors.from_spec(spec).fit(history).predict(horizon).mean(axis=0)


@dataclass(frozen=True)
class Static:
    name: str = "static"

    def schedule(self, counts: np.ndarray, props: np.ndarray, setting: Setting) -> Schedule:
        return [(0, setting.initial(*props.shape[1:]))]

    def first_check(self) -> int | None:
        return None


@dataclass(frozen=True)
class History:
    every: int = 1000
    window: int = 1000
    name: str = "history"

    def schedule(self, counts: np.ndarray, props: np.ndarray, setting: Setting) -> Schedule:
        return online_schedule(self, counts, props, setting)

    def first_check(self) -> int | None:
        return self.every

    def check(self, counts: np.ndarray, props: np.ndarray, current: Plan, setting: Setting,
              memory: list) -> tuple[Plan | None, int]:
        t = len(props)
        return setting.plan(props[max(0, t - self.window): t].mean(axis=0), current), t + self.every


@dataclass(frozen=True)
class Predict:
    every: int = 50
    predictor: str = "ema:halflife=50"
    history: int = 2000  # steps handed to the predictor (bounds its fitting cost)
    first: int = 10  # the first re-plan, as soon as a few steps of history exist
    name: str = "predict"

    def schedule(self, counts: np.ndarray, props: np.ndarray, setting: Setting) -> Schedule:
        checks = [t for t in sorted({self.first, *range(self.every, len(props), self.every)}) if 0 < t < len(props)]
        forecasts = np.stack([_predict_mean(self.predictor, props[max(0, t - self.history): t], self.every)
                              for t in checks]) if checks else np.empty((0, *props.shape[1:]))
        schedule = [(0, setting.initial(*props.shape[1:]))]
        for t, new in zip(checks, setting.plan_many(forecasts), strict=True):
            schedule.append((t, align(schedule[-1][1], new)))
        return schedule

    def first_check(self) -> int | None:
        return self.first if 0 < self.first < self.every else self.every

    def check(self, counts: np.ndarray, props: np.ndarray, current: Plan, setting: Setting,
              memory: list) -> tuple[Plan | None, int]:
        """The re-plan :meth:`schedule` makes at step ``len(props)``, one check at a time (online)."""
        t = len(props)
        forecast = _predict_mean(self.predictor, props[max(0, t - self.history): t], self.every)
        following = (t // self.every + 1) * self.every
        return align(current, setting.plan_many(forecast[None])[0]), (
            self.first if t < self.first < following else following)


def stable_layers(history: np.ndarray, threshold: float = 1.5, recent: int = 3) -> np.ndarray:
    """Online phase rule: bool ``[layers]``, true where the load has stopped moving.

    Uses ``predictors.phases.movement``: how far 100-step block means moved over 500 steps, in units of
    what per-step noise alone would give (about 1 when the load stays put). A layer is stable when the
    last ``recent`` values average below ``threshold``; with too little history nothing is stable.
    """
    from predictors.phases import movement

    moved = movement(history)
    if len(moved) < recent:
        return np.zeros(history.shape[1], dtype=bool)
    return moved[-recent:].mean(axis=0) < threshold


@dataclass(frozen=True)
class PhaseAware:
    transient_every: int = 25
    stable_every: int = 1000
    transient_predictors: tuple[str, ...] = ("ema:halflife=25", "ema:halflife=10")  # the first wins ties
    stable_predictor: str = "sw_avg:window=1000"
    history: int = 2000
    phase_history: int = 1000  # steps the online phase rule looks at
    replay: int = 50  # recent steps replayed to estimate a candidate plan's gain
    payback: int = 200  # steps a new plan has to repay its migration (at least the check interval)
    backtest: int = 8  # past checks whose interval-forecast errors choose each layer's transient predictor
    first: int = 10  # the first check, as soon as a few steps of history exist
    name: str = "phase"

    def schedule(self, counts: np.ndarray, props: np.ndarray, setting: Setting) -> Schedule:
        checks = self.checks(props)
        starts = [max(0, t - self.history) for t, _ in checks]  # the history each check sees
        noise = window_step_noise(props, starts, [t for t, _ in checks]) if checks else None
        all_forecasts = self.forecasts(props, checks, starts)
        current = setting.initial(*props.shape[1:])
        schedule = [(0, current)]
        # A check's forecast and candidate plans do not depend on the plan in force, so a batch of checks is
        # planned, and its candidates replayed, at once; only the choice among them runs check by check.
        for lo in range(0, len(checks), CHECKS_PER_BATCH):
            batch = checks[lo: lo + CHECKS_PER_BATCH]
            forecasts = all_forecasts[lo: lo + len(batch)]
            pairs = [list(pair) for pair in zip(setting.plan_many(forecasts),
                                                setting.plan_many(forecasts, noise[lo: lo + len(batch)]), strict=True)]
            recent = [self._rescaled(counts[max(0, t - self.replay): t], forecast) for (t, _), forecast
                      in zip(batch, forecasts, strict=True)]
            # A candidate's gain is weighed over the next check interval (or the payback span if longer).
            horizons = [max(self._cadence(stable), self.payback) for _, stable in batch]
            layer_time = _layer_time(recent, pairs, setting)
            for (t, _), window, horizon, pair, pair_time in zip(batch, recent, horizons, pairs, layer_time,
                                                                strict=True):
                new = self._choose(window, current, pair, pair_time, setting, horizon / len(window))
                if new is not None:
                    current = new
                    schedule.append((t, current))
        return schedule

    def first_check(self) -> int | None:
        return max(self.first, 1)

    def check(self, counts: np.ndarray, props: np.ndarray, current: Plan, setting: Setting,
              memory: list) -> tuple[Plan | None, int]:
        """The decision :meth:`schedule` takes at step ``t = len(props)``, one check at a time (online).

        ``memory`` holds the earlier checks ``(step, stable)``; this one is appended. Only the last ``backtest``
        of them matter (the forecaster choice), so the same plan comes out as in the batched replay.
        """
        t = len(props)
        stable, following = self._check_at(props, t)
        memory.append((t, stable))
        del memory[: -(self.backtest + 1)]
        starts = [max(0, c - self.history) for c, _ in memory]
        forecast = self.forecasts(props, memory, starts)[-1:]
        noise = window_step_noise(props, starts[-1:], [t])
        pair = [setting.plan_many(forecast)[0], setting.plan_many(forecast, noise)[0]]
        window = self._rescaled(counts[max(0, t - self.replay): t], forecast[0])
        horizon = max(self._cadence(stable), self.payback)
        pair_time = _layer_time([window], [pair], setting)[0]
        return self._choose(window, current, pair, pair_time, setting, horizon / len(window)), following

    @staticmethod
    def _choose(window: np.ndarray, current: Plan, pair: list[Plan], pair_time: np.ndarray, setting: Setting,
                stretch: float) -> Plan | None:
        """Per layer the fastest of the current plan and the candidates over ``window`` (:func:`_fastest`, replay
        times counted ``stretch`` times against the migration stall); None if that is the current plan."""
        candidates = [align(current, new) for new in pair]
        choice = _fastest(window, current, candidates, pair_time, setting, stretch)
        return _pick([current, *candidates], choice) if choice.any() else None

    def _cadence(self, stable: bool) -> int:
        return self.stable_every if stable else self.transient_every

    def forecasts(self, props: np.ndarray, checks: list[tuple[int, bool]], starts: Sequence[int]) -> np.ndarray:
        """float64 ``[checks, layers, experts]``: each check's forecast of the mean load until its next check.

        Stable checks use ``stable_predictor``; transient ones, per layer, whichever of ``transient_predictors``
        forecast the intervals between the last ``backtest`` checks best (:func:`backtest_choice`). Every error
        is measured on steps before the check, so the choice reads the history alone.
        """
        if not checks:
            return np.empty((0, *props.shape[1:]))
        options = np.stack([
            [_predict_mean(self.stable_predictor, props[start: t], self.stable_every)] * len(self.transient_predictors)
            if stable else [_predict_mean(spec, props[start: t], self.transient_every)
                            for spec in self.transient_predictors]
            for (t, stable), start in zip(checks, starts, strict=True)])
        times = [t for t, _ in checks]
        actual = np.array([props[a: b].mean(axis=0) for a, b in itertools.pairwise(times)]).reshape(
            len(times) - 1, *props.shape[1:])
        choice = backtest_choice(options[:-1], actual, self.backtest)
        return np.take_along_axis(options, choice[:, None, :, None], axis=1)[:, 0]

    def checks(self, props: np.ndarray) -> list[tuple[int, bool]]:
        """The steps at which the policy checks its plan, each with whether all layers were stable then.

        They follow from the history alone (not from the plans chosen): every ``transient_every`` steps, or every
        ``stable_every`` once :func:`stable_layers` finds the whole model stable, on multiples of the cadence.
        """
        checks = []
        t = self.first_check()
        while t < len(props):
            stable, following = self._check_at(props, t)
            checks.append((t, stable))
            t = following
        return checks

    def _check_at(self, props: np.ndarray, t: int) -> tuple[bool, int]:
        """Whether every layer looks stable at check ``t``, and the next check's step."""
        stable = bool(stable_layers(props[max(0, t - self.history): t][-self.phase_history:]).all())
        return stable, (t // self._cadence(stable) + 1) * self._cadence(stable)

    @staticmethod
    def _rescaled(recent: np.ndarray, forecast: np.ndarray) -> np.ndarray:
        """The recent counts rescaled to the forecast mean: what a plan is replayed on to estimate its saving, so
        per-step noise, which replicas must absorb, is in the estimate, not only the mean skew."""
        recent_mean = recent.mean(axis=0)
        scale = np.divide(forecast * recent_mean.sum(axis=-1, keepdims=True), recent_mean,
                          out=np.ones_like(forecast), where=recent_mean > 0)
        return recent * scale


@dataclass(frozen=True)
class Oracle:
    every: int = 50
    lookaheads: tuple[int, ...] = (50, 1000)  # future spans whose actual mean load the oracle may plan on
    name: str = "oracle"

    def schedule(self, counts: np.ndarray, props: np.ndarray, setting: Setting) -> Schedule:
        """Every ``every`` steps, in hindsight: plan on the actual mean load of each lookahead span (and on its
        mean + ``tail_z`` x per-step std), and per
        layer keep the current plan or take the candidate that makes the next ``every`` steps fastest,
        migration included."""
        starts = list(range(0, len(props), self.every))
        spans = [(t, min(t + span, len(props))) for t in starts for span in self.lookaheads]
        means = np.stack([props[a: b].mean(axis=0) for a, b in spans])
        mean_plans = setting.plan_many(means)
        tail_plans = setting.plan_many(means, window_step_noise(props, *zip(*spans, strict=True)))
        plans = [p for pair in zip(mean_plans, tail_plans, strict=True) for p in pair]
        n = 2 * len(self.lookaheads)
        schedule = [(0, plans[0])]
        for lo in range(1, len(starts), CHECKS_PER_BATCH):
            batch = range(lo, min(lo + CHECKS_PER_BATCH, len(starts)))
            windows = [counts[starts[i]: starts[i] + self.every] for i in batch]
            layer_time = _layer_time(windows, [plans[i * n: (i + 1) * n] for i in batch], setting)
            for i, window, candidates_time in zip(batch, windows, layer_time, strict=True):
                current = schedule[-1][1]
                candidates = [align(current, candidate) for candidate in plans[i * n: (i + 1) * n]]
                choice = _fastest(window, current, candidates, candidates_time, setting)
                if choice.any():
                    schedule.append((starts[i], _pick([current, *candidates], choice)))
        return schedule


def backtest_choice(forecasts: np.ndarray, actual: np.ndarray, window: int) -> np.ndarray:
    """Per check and layer, which forecaster to trust: int ``[checks + 1, layers]``.

    ``forecasts[checks, forecasters, layers, experts]`` are interval forecasts of the mean load proportions
    whose outcome ``actual[checks, layers, experts]`` is now known. The choice at check ``j`` is the forecaster
    with the least mean L1 error (``sum_e |forecast - actual|``, the mean_wape of DESIGN.md) over checks
    ``j - window .. j - 1``. Until ``window`` outcomes are known the first forecaster is kept (a few noisy
    errors would pick at random), and it wins ties.
    """
    errors = np.abs(forecasts - actual[:, None]).sum(axis=-1)  # [checks, forecasters, layers]
    totals = np.concatenate([np.zeros((1, *errors.shape[1:])), np.cumsum(errors, axis=0)])
    recent = totals[window:] - totals[:-window] if window > 0 else totals
    return np.concatenate([np.zeros((min(window, len(totals)), errors.shape[2]), dtype=np.int64),
                           np.argmin(recent, axis=1)])


def _layer_time(windows: list[np.ndarray], plans: list[list[Plan]], setting: Setting) -> np.ndarray:
    """float64 ``[windows, plans per window, layers]``: each MoE layer's time (the busiest GPU's expert work and
    all-to-alls, :meth:`CostModel.moe_layer_time_s`), summed over the steps of ``windows[i][steps, layers,
    experts]``, under each plan of ``plans[i]``.

    The busiest GPU does not depend on how GPUs are numbered, so plans may be replayed before they are aligned
    to the plan in force; windows of one length are replayed together, as extra layers of one dispatch call.
    """
    layers, n_plans = windows[0].shape[1], len(plans[0])
    local_experts = plans[0][0].slots_per_gpu
    result = np.empty((len(windows), n_plans, layers))
    by_length = defaultdict(list)
    for i, window in enumerate(windows):
        by_length[len(window)].append(i)
    for length, group in by_length.items():
        per_call = max(1, DISPATCH_ROWS // (length * layers * n_plans))
        for lo in range(0, len(group), per_call):
            index = group[lo: lo + per_call]
            stacked = np.concatenate([windows[i] for i in index for _ in range(n_plans)], axis=1)
            tokens = gpu_tokens(stacked, planners.stack([p for i in index for p in plans[i]]), setting.dispatch)
            seconds = setting.cost.moe_layer_time_s(tokens.max(axis=-1), setting.gpus, local_experts)
            result[index] = seconds.sum(axis=0).reshape(len(index), n_plans, layers)
    return result


def _fastest(counts: np.ndarray, current: Plan, candidates: list[Plan], candidates_time: np.ndarray,
             setting: Setting, stretch: float = 1.0) -> np.ndarray:
    """Per layer, the index into ``[current, *candidates]`` of the plan that replays ``counts`` fastest,
    counting each candidate's migration stall from ``current`` (ties keep the current plan).
    ``candidates_time[candidates, layers]``: their layer time over ``counts`` (:func:`_layer_time`); replay times
    count ``stretch`` times (the replayed steps standing for a longer span) against the one-off stall."""
    plans = [current, *candidates]
    replayed = np.concatenate([_layer_time([counts], [[current]], setting)[0], candidates_time])
    stall_s = np.stack([arrivals(current, plan).max(axis=1) for plan in plans]) * (
        setting.cost.bytes_per_expert / setting.cost.link_bandwidth)
    return np.argmin(replayed * stretch + stall_s, axis=0)


def _pick(plans: list[Plan], choice: np.ndarray) -> Plan:
    """Layer ``l`` from ``plans[choice[l]]``."""
    layers = np.arange(len(choice))
    return Plan(np.stack([p.slot_expert for p in plans])[choice, layers],
                np.stack([p.replicas for p in plans])[choice, layers], plans[0].gpus)


def online_schedule(policy, counts: np.ndarray, props: np.ndarray, setting: Setting) -> Schedule:
    """A policy's schedule made one check at a time from the steps before each (what a running job does)."""
    schedule = [(0, setting.initial(*props.shape[1:]))]
    memory: list = []
    t = policy.first_check()
    while t is not None and t < len(props):
        new, following = policy.check(counts[:t], props[:t], schedule[-1][1], setting, memory)
        if new is not None:
            schedule.append((t, new))
        t = following
    return schedule


ONLINE = ("static", "history", "predict", "phase")  # the policies a training run can follow (not the oracle)
POLICIES = {"static": Static, "history": History, "predict": Predict, "phase": PhaseAware, "oracle": Oracle}


def get(names: str, replan_every: int | None = None, predictor: str | None = None) -> list:
    """Policies from a comma list (``all`` for every one); ``replan_every`` sets the cadence of ``history``,
    ``predict`` and (in its transient phase) ``phase``,
    ``predictor`` the forecaster of ``predict`` and the only one of the transient phase of ``phase``."""
    chosen = list(POLICIES) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in POLICIES]
    if unknown or not chosen:
        raise PlacementError(f"unknown policy {', '.join(unknown) or names!r}; choose from all, {', '.join(POLICIES)}")
    if replan_every is not None and replan_every < 1:
        raise PlacementError(f"--replan-every must be >= 1, got {replan_every}")
    if predictor:
        import predictors

        try:
            predictors.from_spec(predictor)
        except ValueError as e:
            raise PlacementError(f"--predictor: {e}") from None
    policies = []
    for name in chosen:
        params: dict = {}
        if name == "history" and replan_every is not None:
            params = {"every": replan_every}
        elif name == "predict":
            params = {"predictor": predictor} if predictor else {}
            params |= {"every": replan_every} if replan_every is not None else {}
        elif name == "phase":
            params = {"transient_predictors": (predictor,)} if predictor else {}
            params |= {"transient_every": replan_every} if replan_every is not None else {}
        policies.append(POLICIES[name](**params))
    return policies


__all__ = ["ONLINE", "POLICIES", "History", "Oracle", "PhaseAware", "Predict", "Schedule", "Setting", "Static",
           "backtest_choice", "get", "online_schedule", "stable_layers", "step_noise", "window_step_noise"]
