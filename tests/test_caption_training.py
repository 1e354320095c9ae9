"""Caption/QA training: what breaks LLaVA training in practice, on a tiny random LLM (SmolLM2's tokenizer and
chat template) with the real EfficientNet-Lite0 tower and a few generated scenes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mixllm.config import ImageConfig, MixLLMConfig
from mixllm.conversation import IGNORE_INDEX, question_prompt
from mixllm.data.llava import load_llava_conversations
from mixllm.data.scenes import write_scenes
from mixllm.loading import build, tiny_language_model
from training.caption import (
    CaptionCollator,
    CaptionRecipe,
    ConversationEncoder,
    answer_loss,
    train_caption,
)
from training.caption_eval import batch_answers
from training.recipe import RecipeError
from training.vision_cache import cached_vision_features

from conftest import assert_greedy_decodes_agree


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, counts={"train": 32, "val": 4, "test": 8}, seed=3, progress=False)
    return root


def _save_tiny_lm(path, hidden: int):
    """``mixllm.loading.tiny_language_model`` (seed 0) saved as a transformers directory."""
    model, tokenizer = tiny_language_model(0, hidden=hidden)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return _save_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), hidden=32)


def _tiny(tiny_lm, pooled_grid=None, lora=None):
    config = MixLLMConfig(language_model=str(tiny_lm), image=ImageConfig(pooled_grid=pooled_grid), lora=lora)
    torch.manual_seed(0)
    return build(config)


def _data(scenes, processor, kind="qa", split="train"):
    convs, _ = load_llava_conversations(scenes / f"{split}_{kind}.json", image_token=processor.token("image"))
    encoder = ConversationEncoder(processor.tokenizer, processor.num_tokens["image"], processor.token_ids["image"])
    return convs, encoder


def _recipe(tiny_lm, scenes, tmp_path, **changes):
    base = dict(stage=1, model={"language_model": str(tiny_lm), "image": {}}, train_data=str(scenes / "train_captions.json"),
                val_data=str(scenes / "val_captions.json"), batch_size=4, max_steps=3, limit_val=4, val_every_n_steps=2,
                output_dir=str(tmp_path / "run"), feature_cache=str(tmp_path / "vf"), progress_bar=False,
                log_every_n_steps=1)  # fmt: skip
    return CaptionRecipe(**{**base, **changes})


def test_every_sample_supervises_exactly_its_answers_each_closed_by_the_end_of_turn_token(scenes, tiny_lm):
    _, processor = _tiny(tiny_lm)
    tok = processor.tokenizer
    for kind in ("qa", "captions"):
        convs, encoder = _data(scenes, processor, kind)
        for conv in convs:
            ids, labels = encoder.encode(conv)
            assert len(ids) == len(labels)
            runs, current = [], []
            for token, label in zip(ids, labels):
                if label == IGNORE_INDEX:
                    if current:
                        runs.append(current)
                    current = []
                else:
                    assert label == token  # labels are the tokens themselves; the loss shifts them
                    current.append(label)
            if current:
                runs.append(current)
            assert len(runs) == len(conv.turns) > 0
            for run, (_, answer) in zip(runs, conv.turns):
                assert run[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
                assert tok.decode(run[:-1]) == answer
            # The first question's prompt is tokenized exactly as at inference.
            first_question = conv.turns[0][0].replace(processor.token("image"), "").strip()
            prompt = tok(question_prompt(tok, first_question, processor.token("image")), add_special_tokens=False)["input_ids"]
            assert ids[: len(prompt)] == prompt


@pytest.mark.parametrize("pooled_grid", [None, 4])
def test_every_batch_has_images_times_visual_tokens_placeholders(scenes, tiny_lm, tmp_path, pooled_grid):
    model, processor = _tiny(tiny_lm, pooled_grid)
    convs, encoder = _data(scenes, processor)
    features = cached_vision_features(model.encoders["image"], processor.image_processor, [c.image for c in convs],
                                      tmp_path, progress=False)  # fmt: skip
    assert features.shape == (len(convs), 49, 1280)
    per_image = 16 if pooled_grid == 4 else 49
    assert processor.num_tokens["image"] == per_image
    loader = DataLoader(encoder.samples(convs), batch_size=5, collate_fn=CaptionCollator(processor, features))
    for batch in loader:
        placeholders = batch["input_ids"] == processor.token_ids["image"]
        assert int(placeholders.sum()) == len(batch["input_ids"]) * per_image
        assert (batch["labels"][placeholders] == IGNORE_INDEX).all()
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
        assert int((batch["labels"] != IGNORE_INDEX).sum(1).min()) > 0
        model.embed_inputs(batch["input_ids"], vision_features=batch["vision_features"])  # the merge's count check passes


def test_answer_loss_is_transformers_loss_with_labels_shifted_once(scenes, tiny_lm, tmp_path):
    model, processor = _tiny(tiny_lm)
    convs, encoder = _data(scenes, processor)
    features = cached_vision_features(model.encoders["image"], processor.image_processor, [c.image for c in convs[:6]],
                                      tmp_path, progress=False)  # fmt: skip
    batch = CaptionCollator(processor, features)(encoder.samples(convs[:6]))
    ours = answer_loss(model, batch)
    reference = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                      vision_features=batch["vision_features"]).loss  # transformers shifts labels itself
    assert math.isfinite(float(ours))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # Non-vacuity: a loss whose labels were shifted twice is a different number.
    shifted = dict(batch, labels=torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1))
    assert abs(float(answer_loss(model, shifted)) - float(ours)) > 1e-3


def test_vision_features_cache_is_reused_and_keyed_by_the_images(scenes, tiny_lm, tmp_path):
    model, processor = _tiny(tiny_lm)
    convs, _ = _data(scenes, processor)
    paths = [c.image for c in convs[:3]]
    first = cached_vision_features(model.encoders["image"], processor.image_processor, paths, tmp_path, progress=False)
    files = list(tmp_path.glob("vision-*.safetensors"))
    assert len(files) == 1
    again = cached_vision_features(model.encoders["image"], processor.image_processor, paths, tmp_path, progress=False)
    assert torch.equal(first, again) and list(tmp_path.glob("vision-*.safetensors")) == files
    with torch.no_grad():
        direct = model.encoders["image"].tower_features(processor.image_processor([__import__("PIL.Image").Image.open(p) for p in paths]))
    torch.testing.assert_close(first.float(), direct, atol=6 * 2**-11, rtol=0)  # float16 storage of values in [0, 6]
    cached_vision_features(model.encoders["image"], processor.image_processor, paths[:2], tmp_path, progress=False)
    assert len(list(tmp_path.glob("vision-*.safetensors"))) == 2  # other images: another key
    # Records sharing an image (LLaVA's sets ask many conversations about one): each image encoded and stored once.
    from safetensors.torch import load_file

    shared = [paths[1], paths[0], paths[1], paths[2], paths[0]]
    for _ in range(2):  # computed, then read back
        rows = cached_vision_features(model.encoders["image"], processor.image_processor, shared, tmp_path, progress=False)
        assert torch.equal(rows, first[torch.tensor([1, 0, 1, 2, 0])])
    stored = set(tmp_path.glob("vision-*.safetensors")) - set(files)
    assert sorted(load_file(str(f))["features"].shape[0] for f in stored) == [2, 3]  # paths[:2]; the 3 shared images


def test_pooling_keeps_the_grid_or_averages_it():
    from mixllm.encoders.image import ImageEncoder

    features = torch.randn(2, 49, 8)
    full = ImageEncoder(ImageConfig(pooled_grid=7), tower=_FakeTower())
    torch.testing.assert_close(full.pool(features), features)
    one = ImageEncoder(ImageConfig(pooled_grid=1), tower=_FakeTower())
    torch.testing.assert_close(one.pool(features), features.mean(1, keepdim=True), atol=1e-6, rtol=0)
    # 7 -> 4: each pooled cell is the mean of its window of the row-major grid (window 0 = rows 0-1, cols 0-1).
    four = ImageEncoder(ImageConfig(pooled_grid=4), tower=_FakeTower()).pool(features)
    grid = features.view(2, 7, 7, 8)
    torch.testing.assert_close(four[:, 0], grid[:, 0:2, 0:2].mean((1, 2)), atol=1e-6, rtol=0)
    torch.testing.assert_close(four[:, 15], grid[:, 5:7, 5:7].mean((1, 2)), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pooled_grid 8 is larger"):
        ImageEncoder(ImageConfig(pooled_grid=8), tower=_FakeTower())


class _FakeTower(torch.nn.Module):
    num_features = 8

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def stage_channels(self, index: int) -> int:
        return self.num_features


def test_batched_greedy_answers_equal_one_at_a_time(scenes, tiny_lm, tmp_path):
    """Left padding (generation): each row's per-step logits and tokens match the row alone. Right padding
    (training): each row's teacher-forced logits at its real positions match the row alone."""
    model, processor = _tiny(tiny_lm)
    convs, encoder = _data(scenes, processor)
    convs = convs[:4]
    features = cached_vision_features(model.encoders["image"], processor.image_processor, [c.image for c in convs],
                                      tmp_path, progress=False)  # fmt: skip
    questions = ["What colour is the star?", "How many shapes are there?", "Is there a red cross in the picture?", "Why?"]
    image = processor.token("image")

    def decode(qs, feats):
        batch = processor([question_prompt(processor.tokenizer, q, image) for q in qs], vision_features=feats, padding_side="left")
        out = model.language_model.generate(
            inputs_embeds=model.embed_inputs(batch["input_ids"], vision_features=feats), attention_mask=batch["attention_mask"],
            max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
            pad_token_id=processor.pad_token_id,
        )  # fmt: skip
        return out.sequences, torch.stack(out.scores, 1)  # (B, new), (B, new, V)

    together_tokens, together_logits = decode(questions, features.float())
    for i, question in enumerate(questions):
        alone_tokens, alone_logits = decode([question], features[i : i + 1].float())
        assert_greedy_decodes_agree(alone_tokens[0], alone_logits[0], together_tokens[i], together_logits[i], atol=1e-4)
    texts = batch_answers(model, processor, questions, vision_features=features.float(), max_new_tokens=6)
    assert len(texts) == 4

    collate = CaptionCollator(processor, features)
    samples = encoder.samples(convs)
    batch = collate(samples)  # right padded
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], vision_features=batch["vision_features"]).logits
        for i, sample in enumerate(samples):
            alone = collate([sample])
            single = model(alone["input_ids"], alone["attention_mask"], vision_features=alone["vision_features"]).logits[0]
            torch.testing.assert_close(logits[i, : single.shape[0]], single, atol=1e-4, rtol=0)


@pytest.mark.parametrize("projector_norm", [False, True])
def test_stage1_steps_change_only_the_projector(scenes, tiny_lm, tmp_path, projector_norm):
    recipe = _recipe(tiny_lm, scenes, tmp_path, model={"language_model": str(tiny_lm), "image": {"projector_norm": projector_norm}})
    from mixllm.modeling import word_embedding_rms
    from training.caption import build_model

    fresh = build_model(recipe)[0]
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert ("projectors.image.norm.weight" in before) == projector_norm
    if projector_norm:  # every image token starts at the root-mean-square of the LLM's word embeddings
        features = torch.randn(2, fresh.encoders["image"].num_tokens, fresh.encoders["image"].output_dim) * 50
        rms = fresh.get_image_features(vision_features=features).pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, word_embedding_rms(fresh.language_model)), rtol=1e-4, atol=0)
    run = train_caption(recipe)
    after = run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projectors.image.") for k in changed), sorted(changed)[:5]
    assert {k for k in before if k.startswith("projectors.image.") and k.endswith("weight")} <= changed
    assert math.isfinite(run.metrics["train/loss"]) and math.isfinite(run.metrics["val/loss"])
    # The checkpoint stores the projector only and reloads to the same weights.
    from mixllm.loading import from_pretrained

    reloaded, _ = from_pretrained(run.model_dir)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, after[key]), key


def _cell_recipe(tiny_lm, scenes, tmp_path, **changes):
    """Stage 1 aligned by cells on the fixture's scenes (written by write_scenes, seed 3)."""
    image = {"standardize_features": True, "position_embedding": True, **changes.pop("image", {})}
    base = _recipe(tiny_lm, scenes, tmp_path).__dict__
    cells = dict(align="cell_words", train_data=None, val_data=None, scenes_dir=str(scenes),
                 scenes={"train": 32, "val": 4, "test": 8, "seed": 3}, model={"language_model": str(tiny_lm), "image": image})
    return CaptionRecipe(**{**base, **cells, **changes})


def test_validation_runs_every_n_steps_across_epochs_and_after_the_last_step(scenes, tiny_lm, tmp_path):
    # 32 scenes in batches of 8: 4 steps an epoch. Every 3 steps across epochs, then the last: 3, 6, 8
    # (Lightning's per-epoch count would validate after steps 3 and 7 and leave the final model unvalidated).
    import csv

    recipe = _cell_recipe(tiny_lm, scenes, tmp_path, batch_size=8, max_steps=8, max_epochs=20, val_every_n_steps=3)
    run = train_caption(recipe)
    rows = list(csv.DictReader((Path(recipe.output_dir) / "logs" / "version_0" / "metrics.csv").open()))
    # Lightning labels a validation inside fit with the step before it (2: after 3 steps), the final one
    # (trainer.validate after fit) with the number of steps taken.
    validated = [int(r["step"]) for r in rows if r.get("val/loss")]
    assert validated == [2, 5, 8] and run.global_step == 8
    assert run.metrics["val/loss"] == pytest.approx(float(rows[-1]["val/loss"]))


def test_stage1_cell_alignment_fits_the_statistics_trains_the_projector_only_and_lowers_its_loss(scenes, tiny_lm, tmp_path):
    from mixllm.loading import from_pretrained
    from training.caption import build_model
    from training.cell_alignment import CellCollator, CellWordObjective, conversation_labels, pair_vectors

    recipe = _cell_recipe(tiny_lm, scenes, tmp_path, batch_size=8, max_steps=40, max_epochs=20, lr=1e-2, val_every_n_steps=40)
    fresh, processor = build_model(recipe)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    convs, _ = _data(scenes, processor, kind="captions")
    features = cached_vision_features(fresh.encoders["image"], processor.image_processor, [c.image for c in convs],
                                      tmp_path / "vf", progress=False)  # fmt: skip
    objective = CellWordObjective(pair_vectors(fresh.language_model.get_input_embeddings().weight.detach(), processor.tokenizer))
    batch = CellCollator(features, conversation_labels(convs, seed=3))(list(range(len(convs))))
    fresh.projectors["image"].fit_input_statistics(features.float())
    with torch.no_grad():
        start = objective(fresh, batch)["loss"]
    from training.cell_alignment import position_words

    positions = position_words(fresh.language_model.get_input_embeddings().weight.detach(), processor.tokenizer)

    run = train_caption(recipe)
    after = run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projectors.image.") for k in changed), sorted(changed)[:5]
    torch.testing.assert_close(after["projectors.image.positions"], positions)  # started at the words, not moved by stage 1
    flat = features.float().reshape(-1, features.shape[-1])  # statistics of the training images' features
    torch.testing.assert_close(after["projectors.image.input_mean"], flat.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after["projectors.image.input_std"], flat.std(0) + 1e-3, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        end = objective(run.model, batch)["loss"]
    assert end < 0.5 * start, (start, end)
    assert 0.0 <= run.metrics["val/cell_accuracy"] <= 1.0 and math.isfinite(run.metrics["val/loss"])
    reloaded, _ = from_pretrained(run.model_dir)  # the statistics travel with the checkpoint
    for key in ("projectors.image.input_mean", "projectors.image.input_std", "projectors.image.positions"):
        assert torch.equal(reloaded.state_dict()[key], after[key])


def test_cell_alignment_recipe_errors_name_the_field(scenes, tiny_lm, tmp_path):
    with pytest.raises(RecipeError, match="^align: must be one of"):
        _recipe(tiny_lm, scenes, tmp_path, align="pixels")
    with pytest.raises(RecipeError, match="^align: cell_words needs the built-in scenes"):
        _recipe(tiny_lm, scenes, tmp_path, align="cell_words")
    with pytest.raises(RecipeError, match="^align: cell_words is a stage-1 objective"):
        _cell_recipe(tiny_lm, scenes, tmp_path, stage=2)
    with pytest.raises(RecipeError, match="^align: cell_words needs one token per grid cell"):
        _cell_recipe(tiny_lm, scenes, tmp_path, image={"pooled_grid": 4})
    unstandardised = train_caption(_recipe(tiny_lm, scenes, tmp_path, max_steps=1, limit_val=0)).model_dir
    from training.caption import build_model

    with pytest.raises(RecipeError, match="^init_from: .* without model.image.standardize_features"):
        build_model(_cell_recipe(tiny_lm, scenes, tmp_path, align="caption", init_from=str(unstandardised)))
    cells = train_caption(_cell_recipe(tiny_lm, scenes, tmp_path, max_steps=1, limit_val=0, output_dir=str(tmp_path / "cells")))
    with pytest.raises(RecipeError, match=r"^init_from: .* does not fit this model .*positions \(49, 32\) there, \(16, 32\) here"):
        build_model(_cell_recipe(tiny_lm, scenes, tmp_path, align="caption", image={"pooled_grid": 4}, init_from=str(cells.model_dir)))


def test_stage2_overfits_32_samples(scenes, tmp_path):
    """The whole (64-wide) tiny LLM and the projector fine-tuned on the 32 training conversations: the answer
    loss on those same conversations falls from ln(vocab) ~ 10.8 to near zero and greedy answers reproduce
    them (the 32-wide twin cannot: measured, it stalls near 2.3). The 7x7 grid is pooled to 2x2 to keep the
    test fast; the first-turn answers still differ per image."""
    lm = _save_tiny_lm(tmp_path / "lm64", hidden=64)
    recipe = _recipe(lm, scenes, tmp_path, stage=2, model={"language_model": str(lm), "image": {"pooled_grid": 2},
                     "freeze_language_model": False}, train_data=str(scenes / "train_qa.json"),
                     val_data=str(scenes / "train_qa.json"), limit_val=32, max_steps=300, max_epochs=1000, batch_size=8,
                     lr=5e-3, lm_lr=5e-3, val_every_n_steps=1000, warmup_ratio=0.0)  # fmt: skip
    run = train_caption(recipe)
    assert run.metrics["val/loss"] < 0.5, run.metrics  # from ln(49,152) ~ 10.8 at the start
    model, processor = run.model, _tiny(lm, pooled_grid=2)[1]
    convs, _ = _data(scenes, processor)
    features = cached_vision_features(model.encoders["image"], processor.image_processor, [c.image for c in convs],
                                      tmp_path / "vf", progress=False)  # fmt: skip
    first = [c.turns[0] for c in convs]
    answers = batch_answers(model, processor, [q.replace("<image>", "").strip() for q, _ in first],
                            vision_features=features.float(), max_new_tokens=4)  # fmt: skip
    assert sum(a == expected for a, (_, expected) in zip(answers, first)) >= 28


def test_recipe_errors_name_the_field(tiny_lm, scenes, tmp_path):
    with pytest.raises(RecipeError, match="^model: stage 1 trains the projector only"):
        _recipe(tiny_lm, scenes, tmp_path, model={"language_model": str(tiny_lm), "image": {}, "lora": {"rank": 4}})
    with pytest.raises(RecipeError, match="^model.image:"):
        _recipe(tiny_lm, scenes, tmp_path, model={"language_model": str(tiny_lm)})
    with pytest.raises(RecipeError, match="^init_from:"):
        _recipe(tiny_lm, scenes, tmp_path, init_from=str(tmp_path / "nothing"))
    with pytest.raises(RecipeError, match="^stage:"):
        _recipe(tiny_lm, scenes, tmp_path, stage=3)
    with pytest.raises(RecipeError, match="^batch_size:"):
        _recipe(tiny_lm, scenes, tmp_path, batch_size=0)
    with pytest.raises(RecipeError, match="^bogus: unknown key"):
        CaptionRecipe.from_yaml("caption_stage1.yaml", bogus=1)
    recipe = CaptionRecipe.from_yaml("caption_stage1.yaml", align="caption", **{"model.image.pooled_grid": 4})
    assert recipe.model["image"]["pooled_grid"] == 4 and recipe.model["image"]["encoder"] == "efficientnet-lite0"


def test_over_long_conversations_are_dropped_not_truncated(scenes, tiny_lm, tmp_path):
    from training.caption import build_model, load_split

    _, processor = _tiny(tiny_lm)
    encoder = ConversationEncoder(processor.tokenizer, processor.num_tokens["image"], processor.token_ids["image"])
    all_convs, _ = load_llava_conversations(scenes / "train_qa.json")
    lengths = sorted(encoder.length(c) for c in all_convs)
    assert lengths[0] < lengths[-1]
    recipe = _recipe(tiny_lm, scenes, tmp_path, stage=2, model={"language_model": str(tiny_lm), "image": {}, "lora": {"rank": 2}},
                     train_data=str(scenes / "train_qa.json"), max_length=lengths[len(lengths) // 2])  # fmt: skip
    _, processor = build_model(recipe)
    encoder = ConversationEncoder(processor.tokenizer, processor.num_tokens["image"], processor.token_ids["image"])
    kept, report = load_split(scenes / "train_qa.json", None, encoder, recipe)
    assert report.counts.get("too long", 0) == 32 - len(kept) > 0
    assert all(encoder.length(c) <= recipe.max_length for c in kept)
    full, _ = load_llava_conversations(scenes / "train_qa.json")
    by_id = {c.id: c for c in full}
    assert all(c.turns == by_id[c.id].turns for c in kept)  # kept ones are whole
    # Each kept sample's tokens are its own (dropped conversations' memoised tokens never leak into them).
    from mixllm.conversation import encode_conversation

    for conv, sample in zip(kept, encoder.samples(kept)):
        assert (sample.input_ids, sample.labels) == encode_conversation(processor.tokenizer, conv.turns)


@pytest.mark.integration
def test_tiny_twin_recipes_run_both_stages_resume_and_evaluate_through_the_cli(tmp_path):
    """caption_stage{1,2}_tiny.yaml: SmolLM2-135M + EfficientNet-Lite0 on 16 generated scenes, 2 steps each,
    through `mixllm train caption`; stage 1 resumes from its Lightning checkpoint; `mixllm eval caption`
    scores stage 2's checkpoint."""
    import json

    from mixllm.cli import main
    from safetensors.torch import load_file

    common = [f"scenes_dir={tmp_path / 'scenes'}", f"feature_cache={tmp_path / 'vf'}", "progress_bar=false"]
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert main(["train", "caption", "--config", "caption_stage1_tiny.yaml", "--set", f"output_dir={s1}", *common]) == 0
    stage1 = load_file(str(s1 / "model" / "mixllm_weights.safetensors"))
    assert stage1 and all(k.startswith("projectors.image.") for k in stage1)
    # position_input: the projector reads 272 feature channels + a 7x7 grid's row and column one-hots
    assert stage1["projectors.image.linear_1.weight"].shape[1] == 272 + 14
    s1_metrics = (s1 / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/side_accuracy" in s1_metrics
    assert main(["train", "caption", "--config", "caption_stage1_tiny.yaml", "--resume", str(s1 / "checkpoints" / "last.ckpt"),
                 "--set", f"output_dir={tmp_path / 's1b'}", "max_steps=3", "max_epochs=5", *common]) == 0  # fmt: skip
    assert json.loads((tmp_path / "s1b" / "model" / "training_run.json").read_text())["global_step"] == 3
    assert main(["train", "caption", "--config", "caption_stage2_tiny.yaml", "--set", f"output_dir={s2}",
                 f"init_from={s1 / 'model'}", *common]) == 0  # fmt: skip
    stage2 = load_file(str(s2 / "model" / "mixllm_weights.safetensors"))
    assert any("lora_" in k for k in stage2) and set(stage1) <= set(stage2)
    assert any(not torch.equal(stage1[k], stage2[k]) for k in stage1)  # stage 2 trains the projector further
    run = json.loads((s2 / "model" / "training_run.json").read_text())
    assert run["stage"] == 2 and run["precision"] == "32-true" and run["data"]["train_used"] == 16
    report = tmp_path / "scenes_qa.json"
    assert main(["eval", "caption", "--model", str(s2 / "model"), "--scenes", str(tmp_path / "scenes"), "--max-scenes", "4",
                 "--output", str(report), "--no-progress"]) == 0  # fmt: skip
    result = json.loads(report.read_text())
    assert set(result["types"]) <= {"colour", "shape", "count", "position", "yesno"} and len(result["types"]) >= 4
    for row in result["types"].values():
        for name in ("model", "majority", "image_zeroed", "zero_shot"):
            assert 0.0 <= row[name] <= 1.0
    assert math.isfinite(result["caption_loss"]["model"]) and (tmp_path / "scenes_qa.md").is_file()


def test_branch_positions_and_mask_on_a_hand_checked_row():
    from training.caption import branch_attention_mask, branch_positions

    segments = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    assert branch_positions(segments).tolist() == [[0, 1, 2, 3, 2, 3, 0]]
    allowed = branch_attention_mask(segments)[0, 0]
    assert allowed[3].nonzero().flatten().tolist() == [0, 1, 2, 3]  # branch 1: prefix + itself, causally
    assert allowed[4].nonzero().flatten().tolist() == [0, 1, 4]  # branch 2 never sees branch 1
    assert allowed[5].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert allowed[6].nonzero().flatten().tolist() == [6]  # padding sees only itself (no empty row)
    additive = branch_attention_mask(segments, boolean=False)[0, 0]
    assert (additive[allowed] == 0).all() and (additive[~allowed] == torch.finfo(torch.float32).min).all()


def test_branched_questions_train_exactly_as_if_each_were_asked_alone(scenes, tiny_lm, tmp_path):
    """One branched sample (image prefix once, each question-answer a branch) gives the loss of the same
    questions asked one per sample, as eval and the API ask them; without the branch mask it differs."""
    import dataclasses

    from training.caption import EncodedSample

    model, processor = _tiny(tiny_lm)
    convs, plain = _data(scenes, processor)
    convs = [c for c in convs if len(c.turns) >= 3][:3]
    image = processor.token("image")
    branched = ConversationEncoder(processor.tokenizer, processor.num_tokens["image"], processor.token_ids["image"],
                                   branch=True, image_token=image)  # fmt: skip
    features = cached_vision_features(model.encoders["image"], processor.image_processor, [c.image for c in convs],
                                      tmp_path, progress=False)  # fmt: skip
    samples = branched.samples(convs)
    for sample, conv in zip(samples, convs):
        assert sample.input_ids.count(processor.token_ids["image"]) == 1  # the image once, in the shared prefix
        assert sample.segments[sample.input_ids.index(processor.token_ids["image"])] == 0
        assert max(sample.segments) == len(conv.turns)
        assert sum(label != IGNORE_INDEX for label in sample.labels) == sum(label != IGNORE_INDEX for label in plain.encode(conv)[1])
    singles = []
    for row, conv in enumerate(convs):
        for k, (question, answer) in enumerate(conv.turns):
            alone = dataclasses.replace(conv, turns=[(question if k == 0 else f"{image}\n{question}", answer)])
            singles.append(EncodedSample(f"{conv.id}-{k}", row, *plain.encode(alone)))
    collate = CaptionCollator(processor, features)
    batch = collate(samples)
    assert int((batch["input_ids"] == processor.token_ids["image"]).sum()) == len(convs) * 49
    with torch.no_grad():
        ours = answer_loss(model, batch)
        alone = answer_loss(model, collate(singles))
        unmasked = answer_loss(model, {k: v for k, v in batch.items() if k not in ("segments", "position_ids")})
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=0)
    assert abs(float(unmasked) - float(ours)) > 1e-3
