"""Whether bfloat16 autocast can train the models on a device.

On a GPU it is a property of the card (`torch.cuda.is_bf16_supported`). On a CPU it depends on
the instruction set: oneDNN runs the LSTM in bf16 only where the CPU has native bf16 support
(AVX-512 BF16 or AMX); on AVX2-only CPUs (some AMD EPYC among them) the LSTM forward raises
"could not create a primitive descriptor". The check runs the ops the models use once — an LSTM,
a linear layer and their backward pass — rather than reading CPU flags, so it also holds for
builds that emulate bf16.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def bf16_problem(device_type: str = "cpu") -> str | None:
    """None if bf16 autocast trains on `device_type` here, else a one-line reason."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None if torch.cuda.is_bf16_supported() else f"{torch.cuda.get_device_name()} has no bfloat16 support"
    if device_type != "cpu":
        return f"bfloat16 autocast is not checked on {device_type!r}"
    try:
        lstm, head = torch.nn.LSTM(8, 8, batch_first=True), torch.nn.Linear(8, 4)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out, _ = lstm(torch.randn(2, 3, 8))
            loss = head(out).float().logsumexp(-1).mean()
        loss.backward()
        if not torch.isfinite(loss):
            return "bfloat16 autocast gave a non-finite loss on a tiny LSTM"
    except RuntimeError as e:
        text = str(e).strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__  # oneDNN appends advice
        return f"this CPU cannot run the LSTM in bfloat16 ({first})"
    return None
