import logging
from collections.abc import Iterator

import pytest
import structlog
import torch
from structlog.testing import capture_logs


@pytest.fixture(autouse=True)
def torch_threads() -> Iterator[None]:
    """A BlockWorker built in this process sets torch's thread count for the process (one per Ray worker,
    `WorkerSetup.num_threads`): give the count back, or every later test computes on one thread."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def debug_logs():
    """Debug events reach capture_logs even after another test configured the CLI's info filter."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**saved)
