"""Model shapes: derived parameter counts against the published ones."""

from __future__ import annotations

import pytest

from workloads.model_catalog import MODELS, UnknownModelError, find_model, model_spec

REQUIRED = [
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Llama-3.1-70B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen2.5-32B-Instruct",
    "Qwen/Qwen2.5-72B-Instruct",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "mistralai/Mixtral-8x7B-Instruct-v0.1",
]


def test_required_models_present() -> None:
    assert set(REQUIRED) <= set(MODELS)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_derived_parameter_count_matches_model_card(model_id: str) -> None:
    m = model_spec(model_id)
    assert m.published_params is not None
    assert m.total_params == pytest.approx(m.published_params, rel=0.015)
    assert m.heads * m.head_dim >= m.hidden * 0.99  # attention width covers the hidden size
    assert m.heads % m.kv_heads == 0


def test_mixtral_active_versus_total() -> None:
    m = model_spec("mixtral-8x7b")
    assert m.is_moe and m.experts == 8 and m.experts_per_token == 2
    assert m.total_params == pytest.approx(46.7e9, rel=0.01)
    assert m.active_params == pytest.approx(12.9e9, rel=0.01)  # Mistral: 12.9B per token
    assert m.weight_bytes == pytest.approx(2 * m.total_params)


def test_kv_cache_bytes_per_token() -> None:
    # Llama-3.1-8B: 2 (K,V) * 32 layers * 8 KV heads * 128 * 2 bytes = 128 KiB per token.
    assert model_spec("meta-llama/Llama-3.1-8B-Instruct").kv_bytes_per_token == 131072
    # LLaMA-7B (MHA): 4x that.
    assert model_spec("llama-7b").kv_bytes_per_token == 524288
    # Qwen2.5-7B: 28 layers * 4 KV heads: 56 KiB.
    assert model_spec("Qwen/Qwen2.5-7B-Instruct").kv_bytes_per_token == 57344


def test_lookup_is_case_insensitive_and_knows_aliases() -> None:
    assert model_spec("META-LLAMA/LLAMA-3.1-8B-INSTRUCT").layers == 32
    assert model_spec("meta-llama/Llama-3.1-8B").model_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert find_model("nobody/nothing") is None
    with pytest.raises(UnknownModelError, match="nobody/nothing"):
        model_spec("nobody/nothing")
