from pathlib import Path

import pytest

from rayquant.storage.synthetic import materialize_synthetic


@pytest.fixture(scope="session")
def synthetic_dir(synthetic_cache: Path) -> Path:
    """Where synthetic:// models of this session live ($RAYQUANT_CACHE/synthetic, see tests/conftest.py)."""
    return synthetic_cache / "synthetic"


@pytest.fixture(scope="session")
def llama_tiny_dir(synthetic_dir: Path) -> Path:
    """synthetic://llama-tiny, built once per session."""
    return materialize_synthetic("llama-tiny", synthetic_dir)


@pytest.fixture(scope="session")
def bert_tiny_dir(synthetic_dir: Path) -> Path:
    """synthetic://bert-tiny (single-file safetensors, encoder-only), built once per session."""
    return materialize_synthetic("bert-tiny", synthetic_dir)
