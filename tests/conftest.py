import os
from pathlib import Path

import pytest

# Embedded Ray must stay on loopback; the synthetic model cache is shared by the whole session.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("RAYQUANT_TEST_CACHE") or tmp_path_factory.mktemp("rayquant-cache"))
    os.environ["RAYQUANT_CACHE"] = str(cache)
    return cache
