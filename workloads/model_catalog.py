"""Transformer shapes of the models copack plans for, from each model's Hugging Face
`config.json` (the numbers vLLM itself reads). Parameter counts are *derived* from the shape
(embeddings + attention + MLP + norms) and checked in the tests against the counts the model
cards publish; the roofline model uses the derived counts so FLOPs and bytes agree."""

from __future__ import annotations

from dataclasses import dataclass


class UnknownModelError(KeyError):
    """A model id that is not in the catalog; the message lists the known ids."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape of a decoder-only transformer (dense or mixture-of-experts)."""

    model_id: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # MLP width (per expert for MoE)
    vocab: int
    bytes_per_param: float = 2.0  # bf16 weights
    kv_bytes_per_elem: float = 2.0  # bf16 KV cache
    experts: int = 1
    experts_per_token: int = 1
    tied_embeddings: bool = False
    gated_mlp: bool = True  # SwiGLU (3 matrices) vs GELU/ReLU MLP (2 matrices)
    qkv_bias: bool = False
    published_params: float | None = None  # the model card's count, for the tests

    # -- derived shape ---------------------------------------------------------------------
    @property
    def attn_params_per_layer(self) -> int:
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return q + kv + o + bias

    @property
    def expert_params(self) -> int:
        mats = 3 if self.gated_mlp else 2
        return mats * self.hidden * self.intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def total_params(self) -> int:
        """All weights held in GPU memory (every expert of an MoE)."""
        router = self.hidden * self.experts if self.experts > 1 else 0
        norms = 2 * self.hidden
        per_layer = self.attn_params_per_layer + self.experts * self.expert_params + router + norms
        return self.layers * per_layer + self.embedding_params + self.hidden

    @property
    def active_params(self) -> int:
        """Weights one token's forward pass multiplies by (top-k experts for an MoE)."""
        router = self.hidden * self.experts if self.experts > 1 else 0
        per_layer = (
            self.attn_params_per_layer
            + self.experts_per_token * self.expert_params
            + router
            + 2 * self.hidden
        )
        return self.layers * per_layer + self.embedding_params + self.hidden

    @property
    def matmul_params_per_token(self) -> int:
        """Active parameters that cost 2 FLOP per token (the input embedding is a lookup)."""
        return self.active_params - self.vocab * self.hidden * (0 if self.tied_embeddings else 1)

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V for one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_elem

    @property
    def is_moe(self) -> bool:
        return self.experts > 1


MODELS: dict[str, ModelSpec] = {
    m.model_id: m
    for m in (
        # meta-llama/Llama-3.1-8B(-Instruct) config.json: 32 layers, hidden 4096, 32 heads,
        # 8 KV heads, head_dim 128, intermediate 14336, vocab 128256, untied. Card: 8.03B.
        ModelSpec(
            "meta-llama/Llama-3.1-8B-Instruct",
            32,
            4096,
            32,
            8,
            128,
            14336,
            128256,
            published_params=8.03e9,
        ),
        # meta-llama/Llama-3.1-70B(-Instruct): 80 layers, hidden 8192, 64 heads, 8 KV, 128,
        # intermediate 28672, vocab 128256. Card: 70.6B.
        ModelSpec(
            "meta-llama/Llama-3.1-70B-Instruct",
            80,
            8192,
            64,
            8,
            128,
            28672,
            128256,
            published_params=70.6e9,
        ),
        # Qwen/Qwen2.5-7B-Instruct: 28 layers, hidden 3584, 28 heads, 4 KV, 128, intermediate
        # 18944, vocab 152064, QKV bias, untied. Card: 7.61B.
        ModelSpec(
            "Qwen/Qwen2.5-7B-Instruct",
            28,
            3584,
            28,
            4,
            128,
            18944,
            152064,
            qkv_bias=True,
            published_params=7.61e9,
        ),
        # Qwen/Qwen2.5-32B-Instruct: 64 layers, hidden 5120, 40 heads, 8 KV, 128, intermediate
        # 27648, vocab 152064, QKV bias. Card: 32.5B.
        ModelSpec(
            "Qwen/Qwen2.5-32B-Instruct",
            64,
            5120,
            40,
            8,
            128,
            27648,
            152064,
            qkv_bias=True,
            published_params=32.5e9,
        ),
        # Qwen/Qwen2.5-72B-Instruct: 80 layers, hidden 8192, 64 heads, 8 KV, 128, intermediate
        # 29568, vocab 152064, QKV bias. Card: 72.7B.
        ModelSpec(
            "Qwen/Qwen2.5-72B-Instruct",
            80,
            8192,
            64,
            8,
            128,
            29568,
            152064,
            qkv_bias=True,
            published_params=72.7e9,
        ),
        # mistralai/Mistral-7B-Instruct-v0.3: 32 layers, hidden 4096, 32 heads, 8 KV, 128,
        # intermediate 14336, vocab 32768. Card: 7.25B.
        ModelSpec(
            "mistralai/Mistral-7B-Instruct-v0.3",
            32,
            4096,
            32,
            8,
            128,
            14336,
            32768,
            published_params=7.25e9,
        ),
        # mistralai/Mixtral-8x7B-Instruct-v0.1: 32 layers, hidden 4096, 32 heads, 8 KV, 128,
        # 8 experts of intermediate 14336, top-2, vocab 32000. Mistral's announcement: 46.7B
        # total, 12.9B used per token.
        ModelSpec(
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            32,
            4096,
            32,
            8,
            128,
            14336,
            32000,
            experts=8,
            experts_per_token=2,
            published_params=46.7e9,
        ),
        # huggyllama/llama-7b (LLaMA-1, what MuxServe profiled): 32 layers, hidden 4096,
        # 32 heads (MHA: 32 KV heads), 128, intermediate 11008, vocab 32000. Paper: 6.7B.
        ModelSpec(
            "huggyllama/llama-7b",
            32,
            4096,
            32,
            32,
            128,
            11008,
            32000,
            published_params=6.74e9,
        ),
        # huggyllama/llama-13b: 40 layers, hidden 5120, 40 heads, 128, intermediate 13824.
        ModelSpec(
            "huggyllama/llama-13b",
            40,
            5120,
            40,
            40,
            128,
            13824,
            32000,
            published_params=13.0e9,
        ),
        # facebook/opt-13b (what DistServe fitted): 40 layers, hidden 5120, 40 heads, ffn 20480,
        # vocab 50272, ReLU MLP (2 matrices), tied embeddings. Paper: 13B.
        ModelSpec(
            "facebook/opt-13b",
            40,
            5120,
            40,
            40,
            128,
            20480,
            50272,
            gated_mlp=False,
            tied_embeddings=True,
            published_params=12.9e9,
        ),
    )
}

# Short names people write in annotations, and the base (non-instruct) checkpoints.
ALIASES: dict[str, str] = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/meta-llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
    "meta-llama/llama-3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
    "meta-llama/meta-llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen/qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B-Instruct",
    "qwen/qwen2.5-32b": "Qwen/Qwen2.5-32B-Instruct",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B-Instruct",
    "qwen/qwen2.5-72b": "Qwen/Qwen2.5-72B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "mistralai/mistral-7b-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "mistralai/mixtral-8x7b-v0.1": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "opt-13b": "facebook/opt-13b",
}
_BY_LOWER = {k.lower(): v for k, v in MODELS.items()}


def find_model(model_id: str) -> ModelSpec | None:
    """Resolve a model id case-insensitively, through the aliases; None when unknown."""
    key = model_id.strip().lower()
    if key in _BY_LOWER:
        return _BY_LOWER[key]
    alias = ALIASES.get(key)
    return MODELS[alias] if alias else None


def model_spec(model_id: str) -> ModelSpec:
    """Like find_model, but raises UnknownModelError naming the id and the known ones."""
    spec = find_model(model_id)
    if spec is None:
        known = ", ".join(sorted(MODELS))
        raise UnknownModelError(f"unknown model {model_id!r} (known: {known})")
    return spec
