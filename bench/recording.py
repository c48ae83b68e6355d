"""What every benchmark writes into bench/RESULTS.md: a section with the date, the exact command, the machine
and the script's own text."""
from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """Host, CPUs, accelerator, versions and the load average now (benchmarks share the machine)."""
    import torch

    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    load_s = f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)" if load else ""
    return (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, {gpu}, Python "
            f"{platform.python_version()}, torch {torch.__version__}{load_s}")


def record(title: str, body: str, machine_line: str | None = None) -> Path:
    """Append `## title (date)` with the command that ran (this process's argv), the machine and `body`."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    script = Path(sys.argv[0]).resolve()
    command = " ".join([".venv/bin/python", f"bench/{script.name}", *sys.argv[1:]])
    block = (f"\n## {title} ({stamp})\n\nCommand: `{command}`  \n"
             f"{machine_line or 'Machine: ' + machine()}  \n{body.rstrip()}\n")
    with RESULTS.open("a") as f:
        f.write(block if RESULTS.exists() and RESULTS.stat().st_size else "# Benchmark results\n" + block)
    print(f"appended to {RESULTS}")
    return RESULTS
