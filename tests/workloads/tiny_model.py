"""A tiny random-weight Llama and a byte-level tokenizer, made on the fly (no download).

Shapes are chosen for vLLM's CPU attention: head_dim must be one of 32, 64, 80, ... (16 fails at
the first request), so hidden 64 over 2 heads gives head_dim 32; one KV head keeps the KV cache
(and so the bytes a KV connector moves) small. The tokenizer maps each byte to one token, so a
prompt of N bytes of ASCII is exactly N prompt tokens.
"""

from __future__ import annotations

from pathlib import Path

MAX_MODEL_LEN = 1024
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tokenizer(out_dir: Path) -> None:
    """Byte-level BPE with no merges: 256 byte tokens plus <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MAX_MODEL_LEN
    fast.save_pretrained(out_dir)


def build_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """Save a 2-layer, hidden-64 LlamaForCausalLM with random weights and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
