"""LoRA on the language model: exact identity at init, only adapters train, merging, checkpoints that
store the adapters and reference the base weights, config validation, and the ranker recipe's "lora"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import make_language_model, make_tokenizer
from mixllm.config import ItemConfig, MixLLMConfig
from mixllm.errors import MixLLMError
from mixllm.loading import build, from_pretrained
from mixllm.lora import DEFAULT_TARGETS, LoRAConfig, LoRALinear, apply_lora, is_lora_key, merge_lora
from mixllm.modeling import WEIGHTS_NAME
from training.ranker_build import build_ranker, load_recipe_dataset, save_ranker
from training.ranker_recipe import RankerRecipe
from training.recipe import RecipeError

FEAT = 8  # item feature width
NUM_LAYERS = 2  # conftest's tiny LMs


def _ids(seed: int = 0, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(4, 24, (batch, length), generator=torch.Generator().manual_seed(seed))


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _perturb_adapters(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give every lora_B (zero at init) random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)


# --- LoRALinear / apply_lora ----------------------------------------------------------------------
def test_fresh_adapters_leave_the_logits_unchanged():
    base = make_language_model("llama", seed=0)
    wrapped = make_language_model("llama", seed=0)  # same seed: the same weights, wrapped separately
    ids = _ids()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    paths = apply_lora(wrapped, LoRAConfig(rank=4, alpha=8.0))
    assert len(paths) == NUM_LAYERS * len(DEFAULT_TARGETS)
    assert sorted(paths) == sorted(_lora_modules(wrapped))
    assert {p.rsplit(".", 1)[-1] for p in paths} == set(DEFAULT_TARGETS)
    for m in _lora_modules(wrapped).values():
        assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
        assert m.scaling == pytest.approx(2.0)
    with torch.no_grad():
        assert torch.equal(wrapped(input_ids=ids).logits, expected)
    # and the adapter path is live: nonzero B changes the output
    _perturb_adapters(wrapped)
    with torch.no_grad():
        assert not torch.allclose(wrapped(input_ids=ids).logits, expected, atol=1e-3)


def test_only_adapters_train_and_base_keys_are_unchanged():
    lm = make_language_model("llama")
    before = lm.state_dict()
    weights = {n: p.data_ptr() for n, p in lm.named_parameters()}
    apply_lora(lm, LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    after = lm.state_dict()
    lora_keys = {k for k in after if is_lora_key(k)}
    assert len(lora_keys) == 2 * NUM_LAYERS * 2  # A and B for 2 targets in 2 layers
    assert all(".q_proj." in k or ".v_proj." in k for k in lora_keys)
    assert set(after) - lora_keys == set(before)  # the base checkpoint's names are unchanged
    for key, value in before.items():
        assert torch.equal(after[key], value)
    for name, p in lm.named_parameters():
        if not is_lora_key(name):
            assert p.data_ptr() == weights[name]  # the same tensors, wrapped, not copied
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == lora_keys

    _perturb_adapters(lm)  # with B = 0 the gradient of A would be zero
    lm.train()
    lm(input_ids=_ids(), labels=_ids()).loss.backward()
    for name, p in lm.named_parameters():
        if is_lora_key(name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_lora_linear_matches_its_formula_and_dropout_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=0.5)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (5, 3) and layer.scaling == 2.0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    layer.eval()
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)
    layer.train()
    torch.manual_seed(1)
    assert not torch.allclose(layer(x), expected, atol=1e-4)  # dropout on the adapter input
    # no bias: still a valid module
    nobias = LoRALinear(nn.Linear(6, 5, bias=False), rank=2, alpha=2.0)
    assert nobias.bias is None and nobias(x).shape == (4, 5)
    assert set(nobias.state_dict()) == {"weight", "lora_A", "lora_B"}


def test_merge_folds_adapters_into_the_weights_without_double_counting():
    lm = make_language_model("llama")
    apply_lora(lm, LoRAConfig(rank=4, alpha=16.0))
    _perturb_adapters(lm, scale=0.3)
    ids = _ids()
    modules = _lora_modules(lm)
    expected_weights = {n: (m.weight + m.scaling * m.lora_B @ m.lora_A).detach().clone() for n, m in modules.items()}
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    assert merge_lora(lm) == len(modules) == NUM_LAYERS * len(DEFAULT_TARGETS)
    x = torch.randn(3, lm.config.hidden_size)
    for name, m in modules.items():
        assert m.merged
        assert torch.allclose(m.weight, expected_weights[name], atol=1e-6), name
        # the merged module is exactly the plain linear layer with W + scaling * B A: the adapter
        # path is skipped (it would add the update a second time)
        with torch.no_grad():
            assert torch.allclose(m(x), F.linear(x, expected_weights[name], m.bias), atol=1e-6), name
    with torch.no_grad():
        after = lm(input_ids=ids).logits
    assert (after - before).abs().max() < 1e-5
    assert merge_lora(lm) == 0  # already merged: merging again changes nothing
    for name, m in modules.items():
        assert torch.allclose(m.weight, expected_weights[name], atol=1e-6)


def test_unknown_target_names_the_targets_and_the_linear_layers():
    lm = make_language_model("llama")
    with pytest.raises(ValueError) as err:
        apply_lora(lm, LoRAConfig(target_modules=["qkv_proj", "nope"]))
    message = str(err.value)
    assert "nope" in message and "qkv_proj" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message, name
    assert not _lora_modules(lm) and all(p.requires_grad for p in lm.parameters())  # nothing was changed
    # GPT-2's attention is Conv1D, not nn.Linear: the default targets match nothing there
    with pytest.raises(ValueError, match=r"match no linear layer.*lm_head"):
        apply_lora(make_language_model("gpt2"), LoRAConfig())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -2}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "q_proj"}, "target_modules"),  # a bare string is not split into characters
        ({"target_modules": ["q_proj", ""]}, "target_modules"),
    ],
)
def test_lora_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^lora\.{field}\b"):
        LoRAConfig(**kwargs)


def test_lora_needs_a_frozen_language_model():
    with pytest.raises(ValueError, match="freeze_language_model"):
        MixLLMConfig(freeze_language_model=False, lora=LoRAConfig())
    with pytest.raises(ValueError, match="freeze_language_model"):
        MixLLMConfig.from_dict({"freeze_language_model": False, "lora": {"rank": 2}})


# --- MixLLMForCausalLM checkpoints ----------------------------------------------------------------
def _lora_config(lm_path) -> MixLLMConfig:
    return MixLLMConfig(
        language_model=str(lm_path),
        item=ItemConfig(feature_dim=FEAT, num_items=0, tokens_per_item=2, projector="linear"),
        lora=LoRAConfig(rank=2, alpha=4.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    )


def _batch(processor):
    g = torch.Generator().manual_seed(3)
    return processor(["the user likes <item> what is good", "rank <item> <item>"],
                     item_features=torch.randn(3, FEAT, generator=g), padding_side="left")  # fmt: skip


def test_config_round_trips_lora():
    config = _lora_config("some/dir")
    again = MixLLMConfig.from_dict(config.to_dict())
    assert isinstance(again.lora, LoRAConfig) and again.lora == config.lora
    assert again == config
    assert MixLLMConfig.from_dict({"lora": {"rank": 3}}).lora == LoRAConfig(rank=3)
    assert MixLLMConfig.from_dict(MixLLMConfig().to_dict()).lora is None


def test_model_with_lora_trains_adapters_and_modalities_only():
    model, processor = build(_lora_config("unused"), language_model=make_language_model("llama"), tokenizer=make_tokenizer())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lm_trainable = {n for n in trainable if n.startswith("language_model.")}
    assert lm_trainable and all(is_lora_key(n) for n in lm_trainable)
    assert len(lm_trainable) == 2 * NUM_LAYERS * 3
    assert any(n.startswith("projectors.item.") for n in trainable)
    _perturb_adapters(model)
    batch = _batch(processor)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad is not None for n in lm_trainable)


def test_checkpoint_stores_adapters_references_base_and_reloads(tmp_path, tiny_lm_dir):
    torch.manual_seed(0)
    model, processor = build(_lora_config(tiny_lm_dir))
    _perturb_adapters(model)
    with torch.no_grad():
        for p in model.projectors.parameters():
            p.add_(0.1)
    batch = _batch(processor)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / WEIGHTS_NAME))
    lora_saved = {k for k in saved if is_lora_key(k)}
    assert lora_saved == {k for k in model.state_dict() if is_lora_key(k)}
    assert len(lora_saved) == 2 * NUM_LAYERS * 3
    assert all(k.startswith("language_model.") for k in lora_saved)
    base_keys = [k for k in saved if k.startswith("language_model.") and not is_lora_key(k)]
    assert not base_keys, base_keys  # the base LLM is referenced, never copied
    assert not any(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight", "embed_tokens.weight")) for k in saved)
    assert any(k.startswith("projectors.item.") for k in saved)

    torch.manual_seed(123)  # a different init of lora_A / projectors must be overwritten by the file
    loaded, loaded_processor = from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.config.lora, LoRAConfig) and loaded.config.lora == model.config.lora
    assert sorted(_lora_modules(loaded.language_model)) == sorted(_lora_modules(model.language_model))
    for key, value in saved.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    reloaded = _batch(loaded_processor)
    assert torch.equal(reloaded["input_ids"], batch["input_ids"])
    with torch.no_grad():
        got = loaded(**reloaded).logits
    assert (got - expected).abs().max() < 1e-5


def test_checkpoint_without_adapters_is_refused_by_a_lora_model(tmp_path, tiny_lm_dir):
    """A lora config expects adapter tensors in the file: a frozen checkpoint does not silently load."""
    frozen = _lora_config(tiny_lm_dir)
    frozen.lora = None
    model, _ = build(frozen)
    model.save_pretrained(tmp_path / "ckpt")
    lora_model, _ = build(_lora_config(tiny_lm_dir))
    with pytest.raises(ValueError, match="missing .*lora_"):
        lora_model.load_trained_weights(tmp_path / "ckpt")


# --- the ranker recipe ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"rank": 0}, "lora.rank"),
        ({"rank": 1.5}, "lora.rank"),
        ({"alpha": 0}, "lora.alpha"),
        ({"target_modules": []}, "lora.target_modules"),
        ({"target_modules": ["q_proj", ""]}, "lora.target_modules"),
    ],
)
def test_recipe_lora_errors_name_the_field(overrides, field):
    """The recipe nests LoRAConfig (``lora:``) and LoRAConfig validates it, once."""
    with pytest.raises(RecipeError) as err:
        RankerRecipe(lora=overrides)
    assert err.value.field == field and str(err.value).startswith(f"{field}:")
    assert isinstance(err.value, MixLLMError)


def _teacher_recipe(targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> RankerRecipe:
    return RankerRecipe(role="teacher", base_model="tiny-random-llama", dataset="synthetic", alpha=0.0,
                        lora={"rank": 2, "alpha": 4.0, "target_modules": list(targets)})  # fmt: skip


def test_lora_recipe_builds_a_ranker_whose_adapters_and_head_train():
    recipe = _teacher_recipe(["q_proj", "o_proj"])
    ranker = build_ranker(recipe, load_recipe_dataset(recipe))
    config = ranker.model.config
    assert config.freeze_language_model and config.lora == LoRAConfig(rank=2, alpha=4.0, target_modules=["q_proj", "o_proj"])
    trainable = {n for n, p in ranker.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if is_lora_key(n)}
    assert trainable - lora == {"score_head.weight"}
    assert len(lora) == 2 * NUM_LAYERS * 2
    assert all(n.startswith("model.language_model.") and (".q_proj." in n or ".o_proj." in n) for n in lora)
    for m in _lora_modules(ranker.model.language_model).values():
        assert m.scaling == 2.0


def test_lora_recipe_with_unknown_targets_names_the_field():
    recipe = _teacher_recipe(["nope"])
    with pytest.raises(RecipeError) as err:
        build_ranker(recipe, load_recipe_dataset(recipe))
    assert err.value.field == "lora.target_modules" and str(err.value).startswith("lora.target_modules:")
    assert "nope" in str(err.value) and "q_proj" in str(err.value)


def test_lora_ranker_checkpoint_reloads_to_identical_scores(tmp_path):
    from mixllm.ranking import ItemCatalog, MixLLMRanker, RankingRequest

    recipe = _teacher_recipe()
    dataset = load_recipe_dataset(recipe)
    ranker = build_ranker(recipe, dataset).eval()
    _perturb_adapters(ranker)
    requests = [RankingRequest([1, 2, 3], [4, 5, 6, 7])]
    with torch.no_grad():
        expected = ranker(ranker.prepare(requests))
    save_ranker(ranker, tmp_path / "ranker", {"test": True})
    saved = load_file(str(tmp_path / "ranker" / WEIGHTS_NAME))
    assert {k for k in saved if is_lora_key(k)} and not [k for k in saved if k.endswith("q_proj.weight")]
    loaded = MixLLMRanker.from_pretrained(tmp_path / "ranker", ItemCatalog(texts=dataset.item_texts))
    assert loaded.model.config.lora == ranker.model.config.lora
    with torch.no_grad():
        got = loaded(loaded.prepare(requests))
    assert (got - expected).abs().max() < 1e-5
