"""Handoff: rank 0 copies a quantized block to host memory for its writer while the advance runs."""

from __future__ import annotations

import torch


class HostCopy:
    """Tensors copied to host memory on a side CUDA stream (pinned, asynchronous); a plain dict on CPU."""

    def __init__(self, tensors: dict[str, torch.Tensor], device: torch.device):
        if device.type != "cuda":
            self.tensors, self.stream = {k: v.cpu() for k, v in tensors.items()}, None
            return
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # the tensors are final
        with torch.cuda.stream(self.stream):
            self.tensors = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                            for k, v in tensors.items()}
        for v in tensors.values():
            v.record_stream(self.stream)  # not reused by the allocator before the copy is done

    def result(self) -> dict[str, torch.Tensor]:
        if self.stream is not None:
            self.stream.synchronize()
        return self.tensors
