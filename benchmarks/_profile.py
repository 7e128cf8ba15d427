"""One line that says where a benchmark's time goes: the top operators by self time (device time
on CUDA), from torch.profiler over a few calls of `work`."""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before the profiler starts: no start/stop lines
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def where_time_goes(work, calls: int = 3, top: int = 4) -> str:
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            work()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    parts = [f"{100 * getattr(e, key) / total:.0f}% {e.key}" for e in events[:top]]
    return f"profile ({'GPU' if cuda else 'CPU'} self time): " + ", ".join(parts)
