"""``moe-trace train --profile START:STOP``: torch.profiler over a window of training steps.

The window's operators and kernels go to ``OUT/profile/``: ``trace.json`` (a Chrome trace: open it in
https://ui.perfetto.dev or chrome://tracing) and ``ops.txt`` (torch.profiler's table, by self time on the
device, or on the CPU when there is no GPU). On a GPU, ``ops.txt`` opens with the window's timeline
(:func:`gpu_timeline`): how long the GPU was busy and how long it waited, and how much of the wait was for the
host to launch the next kernel (a host-bound step: CUDA graphs, ``--compile-mode reduce-overhead``, are the cure)
rather than for anything else. Under torchrun every rank writes its own (``trace.rank-N.json``,
``ops.rank-N.txt``): expert parallelism's waits show up as one rank's all-to-all lasting as long as another
rank's expert GEMMs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_trace.errors import UsageError

GPU_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset")  # what the GPU runs, in a Chrome trace's categories


def parse_window(text: str) -> tuple[int, int]:
    """``"START:STOP"`` -> ``(START, STOP)``, the steps ``START <= step < STOP``."""
    start, _, stop = text.partition(":")
    try:
        window = int(start), int(stop)
    except ValueError:
        raise UsageError(f"--profile takes START:STOP (steps), e.g. 10:15; got {text!r}") from None
    if not 0 <= window[0] < window[1]:
        raise UsageError(f"--profile {text}: need 0 <= START < STOP")
    return window


class StepProfiler:
    """Profiles the steps of ``window`` that a run reaches; call :meth:`step_begins` and :meth:`step_ends`
    around every step, and :meth:`close` at the end (it writes a window cut short by the run's end too)."""

    def __init__(self, window: tuple[int, int], out: Path, device: torch.device, rank: int, world_size: int):
        self.window, self.out, self.device = window, out, device
        self.suffix = f".rank-{rank}" if world_size > 1 else ""
        self._profile: torch.profiler.profile | None = None
        self._first: int | None = None

    def step_begins(self, step: int) -> None:
        if self._profile is None and self.window[0] <= step < self.window[1]:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize(self.device)  # the previous step's kernels stay out of the window
            self._profile = torch.profiler.profile(activities=activities)
            self._profile.__enter__()
            self._first = step

    def step_ends(self, step: int) -> None:
        if self._profile is not None and step + 1 >= self.window[1]:
            self._write(step + 1)

    def close(self, step: int) -> None:
        if self._profile is not None:
            self._write(step)

    def _write(self, stop: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's kernels finish inside it
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace_path = self.out / f"trace{self.suffix}.json"
        profile.export_chrome_trace(str(trace_path))
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = profile.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=100)
        steps = stop - self._first
        timeline = gpu_timeline(json.loads(trace_path.read_text())["traceEvents"])
        summary = "" if timeline is None else (
            f"GPU per step: busy {timeline['busy_ms'] / steps:.2f} ms of {timeline['window_ms'] / steps:.2f} ms; idle "
            f"{timeline['idle_ms'] / steps:.2f} ms, of which {timeline['waiting_for_launch_ms'] / steps:.2f} ms "
            "waiting for the host to launch the next kernel (the profiler slows the host too)\n")
        (self.out / f"ops{self.suffix}.txt").write_text(f"steps {self._first}..{stop - 1}, sorted by {sort}\n"
                                                        f"{summary}{table}\n")


def gpu_timeline(events: list[dict]) -> dict[str, float] | None:
    """The GPU's time in a Chrome trace's ``traceEvents`` (None: no GPU activity): ``window_ms`` from the first
    kernel, copy or memset to the end of the last, ``busy_ms`` when any ran, ``idle_ms`` the rest, and
    ``waiting_for_launch_ms`` the part of it before a kernel whose launch call the host had not yet begun when
    the GPU fell idle: time the GPU waited for the host, not for a dependency or a copy."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_ACTIVITY and "dur" in e), key=lambda e: e["ts"])
    if not gpu:
        return None
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    busy = waiting = 0.0
    end = gpu[0]["ts"]  # where the GPU's work so far ends
    for activity in gpu:
        start, stop = activity["ts"], activity["ts"] + activity["dur"]
        if start > end:
            launched = launches.get(activity.get("args", {}).get("correlation"))
            if launched is not None and launched >= end:
                waiting += start - end
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    window = end - gpu[0]["ts"]
    return {"window_ms": window / 1e3, "busy_ms": busy / 1e3, "idle_ms": (window - busy) / 1e3,
            "waiting_for_launch_ms": waiting / 1e3}
