# Copyright 2026 The hf_magmax Authors. Licensed under the Apache License, Version 2.0.
"""Memory readings shared by the benchmarks (Linux `/proc/self/status`): one field, and a sampler of the peak
anonymous resident memory (`RssAnon`: what the process itself allocated, without the page cache of mapped files)."""

from __future__ import annotations

import threading
import time


def proc_status(field: str) -> int:
    """`field` of `/proc/self/status` (e.g. `RssAnon`, `VmHWM`) in bytes; 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak(threading.Thread):
    """Samples `RssAnon` every `interval` seconds until `running` is set to false; `peak` holds the largest value."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, proc_status("RssAnon"))
            time.sleep(self.interval)
