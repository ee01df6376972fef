"""The CUDA caching allocator's settings for a worker process, made before its first CUDA allocation."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ALLOC_CONF_VAR = "PYTORCH_CUDA_ALLOC_CONF"
ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator(env: MutableMapping[str, str] = os.environ) -> None:
    """Expandable segments, unless the user set PYTORCH_CUDA_ALLOC_CONF. A block allocates and frees K×K
    matrices of several sizes beside its activations (a 405B block's 11 GB Hessian copies): with fixed
    segments the freed ones fragment the pool (10 GB reserved but unusable at 405B: out of memory on an
    80 GB GPU). Read when CUDA first allocates, so it must come before; later it changes nothing."""
    env.setdefault(ALLOC_CONF_VAR, ALLOC_CONF)
