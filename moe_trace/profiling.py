"""``moe-trace train --profile START:STOP``: torch.profiler over a window of training steps.

The window's operators and kernels go to ``OUT/profile/``: ``trace.json`` (a Chrome trace: open it in
https://ui.perfetto.dev or chrome://tracing) and ``ops.txt`` (torch.profiler's table, by self time on the
device, or on the CPU when there is no GPU). Under torchrun every rank writes its own (``trace.rank-N.json``,
``ops.rank-N.txt``): expert parallelism's waits show up as one rank's all-to-all lasting as long as another
rank's expert GEMMs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_trace.errors import UsageError


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
        profile.export_chrome_trace(str(self.out / f"trace{self.suffix}.json"))
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = profile.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=100)
        (self.out / f"ops{self.suffix}.txt").write_text(f"steps {self._first}..{stop - 1}, sorted by {sort}\n"
                                                        f"{table}\n")
