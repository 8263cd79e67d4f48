"""A tiny randomly initialised Llama and byte-level tokenizer: real code paths, no downloads."""

from __future__ import annotations

from pathlib import Path

import torch


def byte_level_tokenizer():
    """256 byte tokens + BOS + EOS; decodes every token back to its bytes."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({"<bos>": 256, "<eos>": 257})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>")


def build_tiny_model(target: Path, n_layers: int, d_model: int, seed: int) -> None:
    """Save a random Llama of the given size with a byte tokenizer as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=258,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=256,
        eos_token_id=257,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    staging = target.with_name(target.name + ".tmp")
    model.save_pretrained(staging)
    byte_level_tokenizer().save_pretrained(staging)
    staging.replace(target)
