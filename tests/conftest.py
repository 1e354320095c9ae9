"""Shared fixtures: tiny random language models and a tiny word-level tokenizer, built in memory."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

WORDS = "the a movie film user likes watched recommend rank item image question answer what is this good bad yes no".split()
VOCAB_SIZE = 64  # tiny LMs' vocabulary; the tokenizer's base vocabulary fits inside it


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def make_language_model(arch: str = "llama", hidden: int = 32, seed: int = 0):
    """A tiny random causal LM of the given architecture (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, **common)
    elif arch == "qwen2":
        config = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, **common)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def arch(request):
    return request.param


@pytest.fixture
def tiny_lm_dir(tmp_path):
    """A tiny Llama + tokenizer saved as a local transformers directory (what checkpoints reference)."""
    path = tmp_path / "tiny-llama"
    make_language_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
