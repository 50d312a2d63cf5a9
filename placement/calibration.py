"""GPU-measured cost of expert work and all-to-all: a calibration file read into interpolating tables.

A calibration file is what ``benchmarks/expert_cost.py`` writes: the device, versions, date and command, and a
grid of measured points. The shipped one (``placement/calibration/h200.json``) is the default of ``simulate``,
``place`` and ``report``; ``--cost FILE`` reads another, ``--cost linear`` keeps the FLOP-rate model.

The model (:class:`ExpertTime`), per expert shape (hidden, ffn):

* for each measured count ``n`` of local experts, the GPU time of one layer's expert work (forward + backward)
  against the tokens on the GPU, on the even split among the experts (the file's ``model_figure`` and
  ``model_split``), made monotone by a running maximum over tokens (timing noise must not make more tokens
  cheaper) and interpolated piecewise-linearly in tokens. Below the smallest measured count the time stays at
  that count's (the floor: the experts' weights are read whatever the tokens); above the largest it continues
  with the last segment's slope (the affine regime);
* between measured ``n``, linear in ``n`` (the floor is weight traffic, which grows with ``n``); below the
  smallest measured ``n``, that ``n``'s curve; above the largest, the last two ``n``'s slope, never below the
  largest's curve (one measured ``n`` alone: its curve for every ``n``);
* a shape not measured borrows the measured shape of nearest ``hidden x ffn``, times scaled by the ratio of the
  two shapes' expert FLOPs (the label says so).

Skew among one GPU's experts is not in the model: for a given total, the calibration's ``half`` and ``one``
splits measure what concentrating the tokens changes (benchmarks/NOTES.md has the figures).

All-to-all (:class:`AllToAllTime`): time per call against the bytes a GPU sends to the others, measured with
NCCL on the GPUs of one host, interpolated the same way. It stands for clusters of up to ``NODE_GPUS`` GPUs
(one NVLink host); larger clusters cross hosts and keep the linear NIC model of ``placement/cost.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_trace.errors import UsageError

CALIBRATION_DIR = Path(__file__).parent / "calibration"
MEASURED = CALIBRATION_DIR / "h200.json"  # benchmarks/expert_cost.py on one H200 (see the file for command, date)
NODE_GPUS = 8  # GPUs per NVLink host: the measured all-to-all stands for clusters up to this size


@dataclass(frozen=True, eq=False)
class Calibration:
    """A calibration file's contents: ``meta`` (device, versions, date, command), the expert grid and the
    all-to-all points (None where not measured)."""

    label: str
    meta: dict[str, Any]
    expert: list[dict[str, Any]] = field(repr=False)
    all_to_all: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def provisional(self) -> bool:
        return bool(self.meta.get("provisional"))

    def expert_time(self, hidden: int, ffn: int) -> ExpertTime:
        return ExpertTime.from_calibration(self, hidden, ffn)

    def all_to_all_time(self) -> AllToAllTime | None:
        points = (self.all_to_all or {}).get("points") or []
        if not points:
            return None
        return AllToAllTime(*_monotone_curve([p["remote_bytes_per_gpu"] for p in points],
                                             [p["ms"] * 1e-3 for p in points]))


def load(path: str | Path, label: str | None = None) -> Calibration:
    """Read a calibration file; a missing or malformed one is a UsageError (one line, exit 2 at the CLI)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no calibration file {path}") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read calibration {path}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a calibration file (expected a JSON object)")
    figure, kind = data.get("model_figure", "gpu_ms"), data.get("model_split", "even")
    points = data.get("expert")
    if not isinstance(points, list) or not any(_usable(p, figure, kind) for p in points):
        raise UsageError(f"{path} holds no measured expert times ({figure!r} on the {kind!r} split); "
                         "write one with benchmarks/expert_cost.py")
    meta = {k: v for k, v in data.items() if k not in ("expert", "all_to_all")}
    name = label or f"measured:{path.name}"
    if data.get("provisional"):
        name += ", provisional"
    return Calibration(name, meta, points, data.get("all_to_all"))


def resolve(spec: str | None) -> Calibration | None:
    """``--cost``: ``linear`` -> None (the FLOP-rate model), ``measured`` -> the shipped calibration, anything
    else a calibration file. ``None`` picks the default: the shipped calibration where it exists, else linear."""
    if spec is None:
        spec = default_spec()
    if spec == "linear":
        return None
    if spec == "measured":
        if not MEASURED.exists():
            raise UsageError(f"no measured calibration shipped ({MEASURED} is missing); run "
                             "benchmarks/expert_cost.py on a GPU, or pass --cost linear or --cost FILE")
        return load(MEASURED, label=f"measured:{MEASURED.stem}")
    return load(spec)


def default_spec() -> str:
    """``measured`` once the GPU-measured calibration ships in ``placement/calibration/``, else ``linear``."""
    return "measured" if MEASURED.exists() else "linear"


def _usable(point: Any, figure: str, kind: str) -> bool:
    return (isinstance(point, dict) and point.get("split") == kind and isinstance(point.get(figure), (int, float))
            and point[figure] > 0 and all(isinstance(point.get(k), int) and point[k] > 0
                                          for k in ("hidden", "ffn", "local_experts", "tokens")))


def _monotone_curve(x: list[float], y: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Points sorted by ``x`` (duplicates averaged), ``y`` made non-decreasing by a running maximum."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xs, inverse = np.unique(x, return_inverse=True)
    ys = np.bincount(inverse, weights=y) / np.bincount(inverse)
    return xs, np.maximum.accumulate(ys)


def _interp_extrapolate(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Piecewise-linear through ``(xs, ys)``; flat below ``xs[0]``, the last segment's slope above ``xs[-1]``."""
    y = np.interp(x, xs, ys)
    if len(xs) > 1:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        y = np.where(x > xs[-1], ys[-1] + slope * (x - xs[-1]), y)
    return y


@dataclass(frozen=True, eq=False)
class ExpertTime:
    """Seconds of one MoE layer's expert work (forward + backward) on one GPU from its tokens and local experts."""

    local_experts: np.ndarray  # measured counts n, ascending
    tokens: list[np.ndarray]  # per n: token grid
    seconds: list[np.ndarray]  # per n: monotone times on that grid
    scale: float = 1.0  # FLOP ratio when the shape was borrowed from another
    source: str = ""  # "H768 F3072" of the measured shape used
    _curves: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_calibration(cls, calibration: Calibration, hidden: int, ffn: int) -> ExpertTime:
        meta = calibration.meta
        figure, kind = meta.get("model_figure", "gpu_ms"), meta.get("model_split", "even")
        points = [p for p in calibration.expert if _usable(p, figure, kind)]
        shapes = sorted({(p["hidden"], p["ffn"]) for p in points})
        nearest = min(shapes, key=lambda s: (abs(np.log(s[0] * s[1] / (hidden * ffn))), s))
        points = [p for p in points if (p["hidden"], p["ffn"]) == nearest]
        counts = sorted({p["local_experts"] for p in points})
        curves = [_monotone_curve([p["tokens"] for p in points if p["local_experts"] == n],
                                  [p[figure] * 1e-3 for p in points if p["local_experts"] == n]) for n in counts]
        return cls(np.array(counts), [c[0] for c in curves], [c[1] for c in curves],
                   scale=hidden * ffn / (nearest[0] * nearest[1]), source=f"H{nearest[0]} F{nearest[1]}")

    def curve(self, local_experts: int) -> tuple[np.ndarray, np.ndarray]:
        """The token grid and times for ``local_experts`` (interpolated between measured counts, cached)."""
        if local_experts < 1:
            raise ValueError(f"local_experts must be >= 1, got {local_experts}")
        if local_experts not in self._curves:
            self._curves[local_experts] = self._blend(local_experts)
        return self._curves[local_experts]

    def _blend(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        counts = self.local_experts
        if n <= counts[0] or len(counts) == 1:
            i = 0 if n <= counts[0] else len(counts) - 1
            return self.tokens[i], self.seconds[i] * self.scale
        # The two measured counts around n (the last two when n lies beyond them), on their common token grid.
        hi = min(int(np.searchsorted(counts, n)), len(counts) - 1)
        lo = hi - 1
        grid = np.union1d(self.tokens[lo], self.tokens[hi])
        a, b = (_interp_extrapolate(grid, self.tokens[i], self.seconds[i]) for i in (lo, hi))
        blended = a + (n - counts[lo]) / (counts[hi] - counts[lo]) * (b - a)
        if n > counts[-1]:
            blended = np.maximum(blended, b)  # more experts never cost less than the most measured
        return grid, np.maximum.accumulate(blended) * self.scale

    def seconds_for(self, tokens: np.ndarray, local_experts: int) -> np.ndarray:
        """Expert time for ``tokens`` (any shape, fractional allowed) on a GPU holding ``local_experts``."""
        grid, seconds = self.curve(local_experts)
        return _interp_extrapolate(np.asarray(tokens, dtype=np.float64), grid, seconds)


@dataclass(frozen=True, eq=False)
class AllToAllTime:
    """Seconds per all-to-all call from the bytes one GPU sends to the others (measured on one host)."""

    remote_bytes: np.ndarray
    seconds: np.ndarray

    def seconds_for(self, remote_bytes: np.ndarray) -> np.ndarray:
        return _interp_extrapolate(np.asarray(remote_bytes, dtype=np.float64), self.remote_bytes, self.seconds)
