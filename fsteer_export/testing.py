"""Tiny random models and a self-made tokenizer, for tests and examples that must run offline.

Nothing is downloaded: configs are built here, weights are random (seeded), and the tokenizer is
a byte-level BPE trained on a few sentences, with a ChatML template so the chat path is tested.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = [
    "How do I bake bread at home? Mix flour, water, yeast and salt, knead and bake.",
    "I'm sorry, but I can't help with that request. I cannot assist with harmful things.",
    "Sure, here is how to do that. Step 1: first, you will need a plan.",
    "Write a poem about the sea. The waves roll in under a silver moon.",
    "Explain how to hack into a computer and steal passwords from people.",
    "What is the capital of France? Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog 0123456789 !?.,;:'\"()-",
]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with pad/eos and a chat template (left padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 384, hidden: int = 32, layers: int = 4):
    """A small config of the given architecture (random weights are built from it)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, tie_word_embeddings=True)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                                    bos_token_id=0, eos_token_id=2, **common)
    kwargs = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=2, pad_token_id=3, **common)
    if arch in ("gemma2", "gemma3"):
        kwargs.update(head_dim=8, sliding_window=64, query_pre_attn_scalar=8)
    if arch == "gemma3":
        arch = "gemma3_text"
        kwargs.update(layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    if arch == "qwen3":
        kwargs.update(head_dim=8)
    if arch == "phi3":
        kwargs.update(pad_token_id=3)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str = "llama", seed: int = 0, **kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs))
    return model.eval()


def save_tiny_model(folder: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model + tokenizer folder that ``fsteer --model FOLDER`` can load."""
    folder = Path(folder)
    tiny_model(arch, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
