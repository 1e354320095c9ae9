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


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    """A tiny image QA checkpoint (``serving_world.build_tiny_qa``), shared by the QA and chat tests."""
    from serving_world import build_tiny_qa

    return build_tiny_qa(tmp_path_factory.mktemp("qa"))


@pytest.fixture(scope="module")
def qa(qa_dir):
    """That checkpoint loaded in-process (``mixllm.qa.QAModel``)."""
    from mixllm.qa import QAModel

    return QAModel.load(qa_dir)


def assert_greedy_decodes_agree(expected_tokens, expected_logits, got_tokens, got_logits, atol: float) -> None:
    """Two greedy decodes of the same model function agree: their per-step logits match within
    ``atol`` and they pick the same token at every step, unless that step is a near-tie.

    Greedy decoding takes an argmax; two float32 computations of the same logits (different batch
    shapes, padding, kernels) differ by rounding, so they can pick different tokens only where the
    two tokens' logits are within 2 * atol of each other: if |got - expected| <= atol element-wise,
    expected[a] >= expected[b] and got[b] >= got[a] imply expected[a] - expected[b] <= 2 * atol.
    Such a step is a genuine tie up to rounding; after it the two continuations legitimately differ,
    so the comparison stops there. Anywhere else a differing token is a bug.

    Args:
        expected_tokens, got_tokens: (new_len,) new token ids of one sequence.
        expected_logits, got_logits: per step, the (vocab,) logits of that sequence.
    """
    steps = min(len(expected_tokens), len(got_tokens))
    for step in range(steps):
        torch.testing.assert_close(got_logits[step], expected_logits[step], atol=atol, rtol=0, msg=f"step {step}")
        a, b = int(expected_tokens[step]), int(got_tokens[step])
        if a != b:
            margin = float(expected_logits[step][a] - expected_logits[step][b])
            assert margin <= 2 * atol, f"step {step}: token {b} instead of {a}, whose logit leads by {margin:.3g}"
            return
    assert len(expected_tokens) == len(got_tokens)
