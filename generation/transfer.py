"""Host-to-device copies that never make the host wait for the device.

PyTorch follows a copy from pageable host memory to a GPU with a synchronisation of the stream, so
the host stops until the GPU has finished everything queued before it. Between batches that costs
nothing, but the next batch is prepared while the running one's steps are still queued
(`pipeline.prepare_batch`): there a blocking copy would drain the GPU's queue. From page-locked
memory the copy is queued like a kernel (its staging buffer is kept until the copy ran).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def upload(data: Tensor | Sequence, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """`data` (a tensor, or numbers in nested lists) as a tensor on `device`, in `dtype` when
    given; from the host, copied without waiting for the device."""
    tensor = data if isinstance(data, Tensor) else torch.tensor(data, dtype=dtype)
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)
