"""The machine a benchmark ran on, recorded beside its figures (imported by the sibling scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides the CPU's bf16 path


def cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def machine(note: str | None = None, libraries: bool = True) -> dict:
    """CPU model, cores, memory, the CPU flags that matter here, the GPU, Python, torch and Ray
    versions (`libraries`=False: without importing them), and the load average at the start."""
    model, flags = cpu_model_and_flags()
    info = {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "python": platform.python_version(),
        "load_avg_at_start": list(os.getloadavg()),
    }
    if libraries:
        import ray
        import torch

        info.update(
            {
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "torch": torch.__version__,
                "ray": ray.__version__,
            }
        )
    if note:
        info["note"] = note
    return info
