"""A tiny random model, its model directory and its exported bundle, built once per session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from encoder.model import EncoderConfig, InterestEncoder
from export.runtime import EncoderRuntime

N_ITEMS = 40
ITEM_IDS = [f"item-{i}" for i in range(1, N_ITEMS + 1)]


def tiny_model(use_memory: bool = True, n_items: int = N_ITEMS, seed: int = 0) -> InterestEncoder:
    """A small random encoder with position and memory effects large enough to notice."""
    torch.manual_seed(seed)
    # dropout > 0 pins that the export leaves the model in eval mode
    cfg = EncoderConfig(
        n_items=n_items,
        d_model=16,
        n_layers=2,
        n_heads=2,
        span=5,
        n_time_buckets=8,
        dropout=0.2,
        memory_decay=0.9,
        use_memory=use_memory,
    )
    model = InterestEncoder(cfg).eval()
    with torch.no_grad():  # a non-trivial distance bias so positions matter
        for block in model.blocks:
            block.attn.rel_bias.normal_(0, 1.0)
    return model


@pytest.fixture(scope="session")
def model() -> InterestEncoder:
    return tiny_model()


@pytest.fixture(scope="session")
def model_dir(model: InterestEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.bundle import save_model_dir

    out = tmp_path_factory.mktemp("model")
    return save_model_dir(model, ITEM_IDS, out, {"ndcg@10": 0.123})


@pytest.fixture(scope="session")
def bundle(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.bundle import export_bundle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_bundle(model_dir=model_dir, out=tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture(scope="session")
def runtime(bundle: Path) -> EncoderRuntime:
    return EncoderRuntime.load(bundle, device="auto", intra_op_threads=1)
