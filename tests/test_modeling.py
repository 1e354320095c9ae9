import pytest
import torch

from conftest import assert_greedy_decodes_agree, make_language_model, make_tokenizer
from mixllm.config import ItemConfig, MixLLMConfig, UserConfig
from mixllm.errors import DataError
from mixllm.loading import build, from_pretrained

F = 8  # item feature width


def _config(lm_path="unused"):
    return MixLLMConfig(
        language_model=str(lm_path),
        item=ItemConfig(feature_dim=F, num_items=20, id_dim=4, tokens_per_item=2),
        user=UserConfig(item_dim=F, num_tokens=3, hidden_dim=16, num_heads=2, max_history=12),
    )


def _model(arch="llama", seed=0):
    torch.manual_seed(seed)
    return build(_config(), language_model=make_language_model(arch, seed=seed), tokenizer=make_tokenizer())


def _inputs(processor, side="left", seed=1):
    g = torch.Generator().manual_seed(seed)
    texts = ["the user <user> likes <item> <item> what is good", "rank <item>", "what is this"]
    return processor(
        texts,
        item_features=torch.randn(3, F, generator=g),
        item_ids=[3, 7, 11],
        user_history=[torch.randn(5, F, generator=g)],
        padding_side=side,
    )


def test_placeholders_are_expanded_and_features_reach_the_embeddings():
    model, processor = _model()
    batch = _inputs(processor)
    ids = batch["input_ids"]
    assert int((ids == model.config.token_ids["item"]).sum()) == 3 * 2  # k = 2 tokens per item
    assert int((ids == model.config.token_ids["user"]).sum()) == 3  # m = 3 tokens per user
    embeds = model.embed_inputs(**{k: v for k, v in batch.items() if k != "attention_mask"})
    item_feats = model.get_item_features(batch["item_features"], batch["item_ids"]).reshape(-1, embeds.shape[-1])
    assert torch.allclose(embeds[ids == model.config.token_ids["item"]], item_feats)
    user_feats = model.get_user_features(batch["user_history"], batch["user_history_mask"]).reshape(-1, embeds.shape[-1])
    assert torch.allclose(embeds[ids == model.config.token_ids["user"]], user_feats)


def test_backbones_left_and_right_padding_match_unpadded_rows(arch):
    model, processor = _model(arch)
    outputs = {side: model(**_inputs(processor, side)).logits for side in ("left", "right")}
    left, right = _inputs(processor, "left"), _inputs(processor, "right")
    for row in range(3):
        lm, rm = left["attention_mask"][row].bool(), right["attention_mask"][row].bool()
        assert torch.allclose(outputs["left"][row][lm], outputs["right"][row][rm], atol=1e-5), arch
    # Row 2 has no modality inputs: it must equal the language model run on the text alone.
    text_only = processor("what is this")
    direct = model.language_model(input_ids=text_only["input_ids"]).logits[0]
    assert torch.allclose(outputs["right"][2][right["attention_mask"][2].bool()], direct, atol=1e-5)


def test_frozen_llm_only_encoders_and_projectors_get_gradients():
    model, processor = _model()
    model.train()
    batch = _inputs(processor)
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("language_model."):
            assert p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs", [dict(do_sample=False), dict(do_sample=True, temperature=0.8, top_p=0.9), dict(num_beams=3, do_sample=False)])
def test_generate_modes(kwargs):
    model, processor = _model()
    batch = _inputs(processor)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=5, pad_token_id=processor.pad_token_id, **kwargs)
    assert out.shape[0] == 3 and 1 <= out.shape[1] <= 5


def test_greedy_generation_of_a_padded_batch_matches_each_row_alone():
    model, processor = _model()
    batch = _inputs(processor, "left")
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=processor.pad_token_id, output_scores=True,
                    return_dict_in_generate=True)
    together = model.generate(**batch, **settings)
    alone = processor("rank <item>", item_features=batch["item_features"][2:3], item_ids=batch["item_ids"][2:3])
    single = model.generate(**alone, **settings)
    # Left padding changes the shapes (and so the float32 rounding), not the function: at every step
    # the padded row's logits equal the row alone's, and greedy picks the same token except at a
    # near-tie. atol 1e-5: |logits| < 1 here and the two paths differ by ~1e-7 (a few float32 ulps
    # through two layers); this seeded model's smallest top-1 lead is ~1.6e-3, so no step is a tie.
    assert_greedy_decodes_agree(single.sequences[0], [s[0] for s in single.scores],
                                together.sequences[1], [s[1] for s in together.scores], atol=1e-5)


def test_processor_rejects_count_mismatch_with_a_clear_error():
    _, processor = _model()
    with pytest.raises(DataError, match=r"item: the text has 2 <item> placeholder\(s\) but 1 input\(s\)"):
        processor("a <item> b <item>", item_features=torch.randn(1, F), item_ids=[1])
    with pytest.raises(DataError, match="user_history\\[0\\] must be a non-empty"):
        processor("<user> hi", user_history=[torch.zeros(0, F)])


def test_processor_remembers_text_ids_without_going_stale():
    _, processor = _model()
    tokenizer = processor.tokenizer
    text = "the user <user> likes <item> <item> zebra"
    first = processor.text_ids(text)
    assert first == tokenizer(text, add_special_tokens=False)["input_ids"]
    first.append(-1)  # a caller's list is its own: the remembered ids are untouched
    assert processor.text_ids(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    batch = processor([text, text], item_features=torch.randn(4, F), item_ids=[1, 2, 3, 4],
                      user_history=[torch.randn(2, F), torch.randn(3, F)])  # fmt: skip
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    tokenizer.add_tokens(["zebra"])  # the vocabulary changes: the text tokenizes anew
    assert processor.text_ids(text) == tokenizer(text, add_special_tokens=False)["input_ids"] != first[:-1]


def test_item_ids_out_of_range_are_rejected():
    model, processor = _model()
    batch = processor("rank <item>", item_features=torch.randn(1, F), item_ids=[99])
    with pytest.raises(ValueError, match=r"item_ids must lie in \[0, 20\)"):
        model(**batch)


# A reloaded model holds bit-for-bit copies of the weights (checked exactly: copies are equal), so it
# computes the same function; its logits are recomputed, not copied, so they are compared to float32
# rounding: 1e-5 + 1e-5 * |logit| is ~80 ulps (float32 eps 1.2e-7) at every magnitude (|logits| < 1,
# or ~16 once the tied embedding is shifted by 0.5), while a weight left out of the checkpoint moves
# the logits by >= 1e-2 (the trained parts were shifted by 0.1 or 0.5).
ROUND_TRIP = dict(atol=1e-5, rtol=1e-5)


def _assert_same_weights(loaded, model) -> None:
    expected = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, tiny_lm_dir):
    torch.manual_seed(0)
    model, processor = build(_config(tiny_lm_dir))
    for p in model.projectors.parameters():  # make trained parts differ from a fresh init
        p.data.add_(0.1)
    batch = _inputs(processor)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path / "ckpt", provenance={"data": "unit-test"})
    saved = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "ckpt" / "mixllm_weights.safetensors")))
    assert saved and not any(k.startswith("language_model.") for k in saved)  # the LLM is referenced, not copied
    torch.manual_seed(123)  # a different init must be overwritten by the loaded weights
    loaded, loaded_processor = from_pretrained(tmp_path / "ckpt")
    assert loaded.config.token_ids == model.config.token_ids
    reloaded_batch = _inputs(loaded_processor)
    assert torch.equal(reloaded_batch["input_ids"], batch["input_ids"])
    _assert_same_weights(loaded, model)
    torch.testing.assert_close(loaded(**reloaded_batch).logits, expected, **ROUND_TRIP)


def test_fully_trained_llm_with_tied_embeddings_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    tied = make_language_model("llama")
    tied.config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(tied.config)  # SmolLM2 ties its embeddings like this
    tied.save_pretrained(tmp_path / "tied")
    make_tokenizer().save_pretrained(tmp_path / "tied")
    config = _config(tmp_path / "tied")
    config.freeze_language_model = False
    model, processor = build(config)
    lm = model.language_model
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    lm.get_input_embeddings().weight.data.add_(0.5)  # "training" moved the shared embedding
    batch = _inputs(processor)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    loaded, _ = from_pretrained(tmp_path / "ckpt")
    _assert_same_weights(loaded, model)
    torch.testing.assert_close(loaded(**batch).logits, expected, **ROUND_TRIP)
