"""Fixtures of the evaluation tests: the data tests' small tokenizer, and a tiny random InternLM2 exported
as an HF checkpoint with that tokenizer (a real model for the CLI to load)."""

from pathlib import Path

import pytest

from internlm2.model import save_pretrained
from tests.data.conftest import small_tokenizer  # noqa: F401  (a fixture, shared)
from tests.test_model_support import random_model, tiny_config


@pytest.fixture(scope="session")
def tiny_checkpoint(small_tokenizer, tmp_path_factory) -> Path:  # noqa: F811
    model = random_model(tiny_config(vocab_size=small_tokenizer.vocab_size, max_position_embeddings=128,
                                     rope_scaling_factor=None))
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(model, directory, tokenizer_directory=Path(small_tokenizer.source).parent)
    return directory
