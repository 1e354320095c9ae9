"""Can stage 2 learn to bind a question to one shape? A probe on the scenes' binding questions.

    python -m training.qa_binding_probe --tokens projector --output-dir runs/bind_projector
    python -m training.qa_binding_probe --tokens words --scale 1 --output-dir runs/bind_words
    python -m training.qa_binding_probe --tokens words --scale 65 --output-dir runs/bind_words_x65

It trains the stage-2 recipe (``--config``, default ``training/configs/caption_stage2.yaml``, with ``--set``
overrides; 120 steps unless overridden) on the colour and shape questions of the scenes with 2-4 shapes,
one question a sample: the questions that reading the image in aggregate cannot answer ("What colour is
the star?" beside a blue circle). Its validation loss (per supervised token: the answer and the end of
turn) says how fast the LLM learns to bind the question to one shape, given

- ``projector``: the recipe's image tokens (stage 1's projector on the tower's features);
- ``words``: an oracle. The cell holding each shape gets the word embeddings E(" colour") + E(" kind")
  times ``--scale`` and every other cell zeros, bypassing the projector: image tokens that read like
  words. ``--scale 65`` gives them the norm of the stage-1 MLP projector's tokens (~300 against ~4.5).

A probe, not a product path: the oracle swaps the feature cache and the model's image features in place.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mixllm.data.scenes import GRID

BINDING_TYPES = ("colour", "shape")


def binding_records(qa_json: Path) -> list[dict]:
    """One single-question record per colour or shape question of a scene with more than one shape
    (its count question's answer), in LLaVA's format; image paths as the loader resolved them."""
    from mixllm.data.llava import load_llava_conversations
    from training.caption_eval import single_questions

    conversations, _ = load_llava_conversations(qa_json, check_images=False)
    questions = single_questions(conversations, "<image>")
    counts = {q["id"]: int(q["answer"]) for q in questions if q["type"] == "count"}
    return [{"id": f"{q['id']}-{q['type']}", "image": str(conversations[q["row"]].image), "question_types": [q["type"]],
             "conversations": [{"from": "human", "value": f"<image>\n{q['question']}"}, {"from": "gpt", "value": q["answer"]}]}
            for q in questions if q["type"] in BINDING_TYPES and counts[q["id"]] > 1]  # fmt: skip


def word_tokens(scene, embedding: torch.Tensor, tokenizer, scale: float, grid: int = GRID) -> torch.Tensor:
    """(grid*grid, hidden): E(" colour") + E(" kind") (first sub-token of each) on each shape's cell, zeros
    elsewhere, times ``scale``: the targets of stage 1's cell alignment (:mod:`training.cell_alignment`)."""
    from training.cell_alignment import cell_labels, cell_targets, pair_vectors

    return cell_targets(cell_labels(scene, grid), pair_vectors(embedding, tokenizer)) * scale


def _use_word_tokens(recipe, scale: float) -> None:
    """Swap in the oracle: the feature cache returns word tokens per image, the model takes them as its
    image tokens (the projector bypassed)."""
    import training.caption as caption
    import training.vision_cache as vision_cache
    from mixllm.data.scenes import generate_split, parse_scene_id

    seed, held = int(recipe.scenes["seed"]), {}
    scenes = {split: generate_split(split, int(recipe.scenes[split]), seed=seed) for split in ("train", "val")}
    build_model = caption.build_model

    def build(recipe_):
        model, processor = build_model(recipe_)
        held["embedding"] = model.language_model.get_input_embeddings().weight.detach().float().clone()
        held["tokenizer"] = processor.tokenizer
        model.get_image_features = lambda pixel_values=None, vision_features=None: vision_features.to(held["embedding"].dtype)
        return model, processor

    def features(encoder, image_processor, paths, cache, progress=True):
        rows = []
        for path in paths:
            split, index = parse_scene_id(Path(path).stem)  # ValueError: not a built-in scene image
            scene = scenes[split][index]
            rows.append(word_tokens(scene, held["embedding"], held["tokenizer"], scale))
        return torch.stack(rows)

    caption.build_model = build
    vision_cache.cached_vision_features = features


def main(argv: list[str] | None = None) -> int:
    from training.caption import CaptionRecipe, data_files, train_caption
    from training.recipe import parse_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", choices=("projector", "words"), default="projector")
    parser.add_argument("--scale", type=float, default=1.0, help="--tokens words: multiply the word tokens by this")
    parser.add_argument("--config", default="training/configs/caption_stage2.yaml")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="recipe overrides")
    args = parser.parse_args(argv)
    overrides = {"max_steps": 120, "val_every_n_steps": 40, "limit_val": 128, "checkpoint_every_n_steps": 1000,
                 **parse_overrides(args.set)}  # fmt: skip
    _, scenes_root = data_files(CaptionRecipe.from_yaml(args.config, **overrides), "train")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (out / f"{split}_binding.json").write_text(json.dumps(binding_records(scenes_root / f"{split}_qa.json")))
    overrides.update(train_data=str(out / "train_binding.json"), val_data=str(out / "val_binding.json"),
                     image_folder=str(scenes_root), output_dir=str(out / "run"))
    recipe = CaptionRecipe.from_yaml(args.config, **overrides)
    if args.tokens == "words":
        _use_word_tokens(recipe, args.scale)
    run = train_caption(recipe)
    print(f"validation loss by step: {out / 'run' / 'logs'} (CSV); final {run.metrics}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
