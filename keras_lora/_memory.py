"""Resident-memory readings for the benchmark and the digits experiment.

On Linux the peak resident set (VmHWM) can be reset to the current one by
writing "5" to /proc/self/clear_refs, so a peak can be taken over one phase
of a process. Elsewhere the process-wide `ru_maxrss` stands in, a looser
bound that never resets.
"""

import sys


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _maxrss_bytes():
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Context manager measuring peak resident-memory growth over a block.

    `delta_bytes` is the peak resident set during the block minus the
    resident set at its start; `method` says how it was read.
    """

    def __enter__(self):
        try:
            self.start_bytes = _status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._peak = lambda: _status_bytes("VmHWM")
            self.method = "linux VmHWM after clear_refs, minus VmRSS at start"
        except OSError:
            self.start_bytes = _maxrss_bytes()
            self._peak = _maxrss_bytes
            self.method = "getrusage ru_maxrss growth"
        return self

    def __exit__(self, *exc):
        self.peak_bytes = self._peak()
        self.delta_bytes = max(self.peak_bytes - self.start_bytes, 0)
        return False
