"""What a benchmark records about the machine it ran on (the machine is shared: what else was busy matters)."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

__all__ = ["machine"]


def machine() -> dict[str, Any]:
    """The machine, and what else was using its CPUs when the benchmark started (shared machines)."""
    ps = subprocess.run(
        ["ps", "-eo", "pid=,pcpu=,args=", "--sort=-pcpu"], capture_output=True, text=True
    ).stdout.splitlines()
    busy = []
    for line in ps[:6]:
        pid, cpu, args = line.split(None, 2)
        if int(pid) != os.getpid() and float(cpu) >= 20:
            busy.append(f"{float(cpu):.0f}% {args[:90]}")
    return {
        "cpus": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch_threads_per_process": 1,
        "other_busy_processes_at_start": busy,
    }
