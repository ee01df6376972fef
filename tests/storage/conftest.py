from pathlib import Path

import pytest

from rayquant.storage.model_source import ModelSource
from rayquant.storage.synthetic import materialize_synthetic

from .staged_output import make_source


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


@pytest.fixture
def source(tmp_path: Path) -> ModelSource:
    """The staging and finish tests' two-shard bf16 model (staged_output.py)."""
    return make_source(tmp_path / "model")
