"""The autoscaling policy: from replica-reported ongoing request counts to a
replica count, with Ray Serve's ``target_ongoing_requests``, look-back
window and up/down-scale delays. Pure computation on given times and
numbers (no IO, no clock), so it is tested directly."""
from __future__ import annotations

import math
from collections import deque

from .config import AutoscalingConfig


class AutoscalingPolicy:
    """One deployment's autoscaling state."""

    def __init__(self, config: AutoscalingConfig) -> None:
        self.config = config
        self.samples: deque[tuple[float, float]] = deque()   # (time, total ongoing)
        self.upscale_since: float | None = None
        self.downscale_since: float | None = None

    def record(self, now: float, total_ongoing: float) -> None:
        """One measurement: the sum of the replicas' ongoing requests."""
        self.samples.append((now, float(total_ongoing)))
        horizon = now - max(self.config.look_back_period_s, 0.0)
        while len(self.samples) > 1 and self.samples[0][0] < horizon:
            self.samples.popleft()

    def desired(self, current: int) -> int:
        """The replica count the load asks for now, before the delays."""
        c = self.config
        if not self.samples:
            return max(c.min_replicas, min(current, c.max_replicas))
        avg = sum(v for _, v in self.samples) / len(self.samples)
        raw: float = math.ceil(avg / c.target_ongoing_requests - 1e-9) if avg > 0 else 0
        if current > 0:
            factor = c.get_upscaling_factor() if raw > current else \
                c.get_downscaling_factor()
            if factor != 1.0:
                raw = current + (raw - current) * factor
                raw = math.ceil(raw) if raw > current else math.floor(raw)
        return max(c.min_replicas, min(c.max_replicas, int(raw)))

    def decide(self, now: float, current: int) -> int:
        """The replica count to run: ``desired`` once it has asked for more
        (fewer) replicas for ``upscale_delay_s`` (``downscale_delay_s``)."""
        want = self.desired(current)
        c = self.config
        if want > current:
            self.downscale_since = None
            if self.upscale_since is None:
                self.upscale_since = now
            if now - self.upscale_since >= c.upscale_delay_s:
                self.upscale_since = None
                return want
        elif want < current:
            self.upscale_since = None
            if self.downscale_since is None:
                self.downscale_since = now
            delay = c.downscale_delay_s
            if want == 0 and current == 1 and c.downscale_to_zero_delay_s is not None:
                delay = c.downscale_to_zero_delay_s
            if now - self.downscale_since >= delay:
                self.downscale_since = None
                return want
        else:
            self.upscale_since = self.downscale_since = None
        return current
