from collections.abc import Iterator

import pytest

from tests.ray_head import RayHead, run_ray_head
from tests.s3_server import S3Server


@pytest.fixture(scope="session")
def ray_head(synthetic_cache, s3_server: S3Server) -> Iterator[RayHead]:
    """A real Ray head on 127.0.0.1 with token auth (tests/ray_head.py), one per session; its jobs share
    the session's RAYQUANT_CACHE (started after it is set) and have the S3 server's credentials."""
    with run_ray_head(num_cpus=2, env=s3_server.env()) as head:
        yield head
