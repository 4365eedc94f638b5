"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import os
import platform

import torch


def machine(device: str | torch.device) -> dict:
    """Device, CPU count, torch threads and versions, for a benchmark's JSON."""
    device = torch.device(device)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
