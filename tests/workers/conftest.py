from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def torch_threads() -> Iterator[None]:
    """A BlockWorker built in this process sets torch's thread count for the process (one per Ray worker,
    `WorkerSetup.num_threads`): give the count back, or every later test computes on one thread."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
