"""DeviceOutOfMemory's message: where, the allocation torch refused, and what to change."""

import torch

from rayquant.workers.out_of_memory import describe


def test_the_message_names_the_place_the_allocation_and_the_fix() -> None:
    torch_says = ("CUDA out of memory. Tried to allocate 13.00 GiB. GPU 0 has a total capacity of 79.18 GiB of "
                  "which 4.20 GiB is free.")
    # a CUDA device whose figures cannot be read (here: no CUDA at all) still gets the rest of the message
    err = describe(torch.OutOfMemoryError(torch_says), 1, torch.device("cuda", 0), "block 3, stage solve")
    assert str(err).startswith("worker rank 1 ran out of GPU memory in block 3, stage solve "
                               "(tried to allocate 13.00 GiB")
    assert "rayquant plan" in str(err) and "cluster.num_workers" in str(err) and "resumes" in str(err)
    plain = describe(torch.OutOfMemoryError("no figures"), 0, torch.device("cpu"), "the in-pass evaluation")
    assert "device memory in the in-pass evaluation (an allocation failed)" in str(plain)
