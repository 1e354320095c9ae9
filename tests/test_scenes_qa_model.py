"""The committed image QA default (checkpoints/scenes_qa) on held-out scenes: its answers come from the image."""

from __future__ import annotations

import pytest
import torch

from mixllm.qa import DEFAULT_QA_CHECKPOINT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """40 test scenes (5 questions each) and the training split's majority answer per question type."""
    from mixllm.data.llava import load_llava_conversations
    from mixllm.data.scenes import write_scenes
    from training.caption_eval import majority_answers, single_questions

    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, counts={"train": 400, "test": 40}, seed=0, progress=False)
    test, _ = load_llava_conversations(root / "test_qa.json")
    return test, single_questions(test, "<image>"), majority_answers(root / "train_qa.json", "<image>"), root


@pytest.fixture(scope="module")
def qa():
    """The committed default as `mixllm ask` and the service load it (adapters merged, CPU, fp32)."""
    from mixllm.qa import QAModel

    return QAModel.load(DEFAULT_QA_CHECKPOINT)


def test_zeroing_the_image_features_brings_accuracy_down_to_the_majority_baseline(held_out, qa, tmp_path):
    """With the image the default answers most held-out questions; with the vision features replaced by zeros
    (same prompts, same model) it is no better than always giving each type's majority answer."""
    from training.caption_eval import batch_answers, normalize
    from training.vision_cache import cached_vision_features

    conversations, questions, majority, _ = held_out
    model, processor = qa.model, qa.processor
    feats = cached_vision_features(model.encoders["image"], processor.image_processor, [c.image for c in conversations],
                                   tmp_path, progress=False).float()  # fmt: skip

    def accuracy(zero: bool) -> float:
        hits = 0
        for start in range(0, len(questions), 24):
            chunk = questions[start : start + 24]
            rows = feats[torch.tensor([q["row"] for q in chunk])]
            answers = batch_answers(model, processor, [q["question"] for q in chunk],
                                    vision_features=torch.zeros_like(rows) if zero else rows)  # fmt: skip
            hits += sum(normalize(a) == normalize(q["answer"]) for q, a in zip(chunk, answers))
        return hits / len(questions)

    baseline = sum(normalize(q["answer"]) == majority[q["type"]] for q in questions) / len(questions)
    with_image, zeroed = accuracy(zero=False), accuracy(zero=True)
    print(f"with the image {with_image:.3f}, zeroed {zeroed:.3f}, majority baseline {baseline:.3f}")
    # Thresholds set on session 11's default (these 200 questions, Intel Xeon: 0.844 / 0.322 / 0.281); the
    # full report's 993 questions give 0.868 / 0.317 there, 0.912 / 0.325 for session 12's default and
    # 0.979 / 0.316 for session 13's (CPU and H100 alike). A position question offers two sides, so a
    # blind model gets ~0.5 of those where the per-type majority gets ~0.25: "down to the baseline" allows that.
    assert with_image >= baseline + 0.4, (with_image, baseline)
    assert with_image >= zeroed + 0.4, (with_image, zeroed)
    assert zeroed <= baseline + 0.1, (zeroed, baseline)


def test_the_default_tells_left_from_right(held_out, qa):
    """The left/right questions, which raster order alone does not answer (session 12's default: 0.60 on the
    report's 98): the default's projector reads each token's column (``image.position_input``). On these 40
    scenes it answers them from pixels, through the same path as `mixllm ask`."""
    from PIL import Image

    from mixllm.generation import GenerationSettings
    from mixllm.qa import user_message
    from training.caption_eval import normalize

    conversations, questions, _, _ = held_out
    asked = [q for q in questions if q["type"] == "position" and q["answer"] in ("left", "right")]
    assert qa.model.config.image.position_input

    def answer(q: dict) -> str:
        image = Image.open(conversations[q["row"]].image).convert("RGB")
        return "".join(qa.complete([user_message(q["question"])], [image], GenerationSettings(max_new_tokens=8)))

    hits = sum(normalize(answer(q)) == q["answer"] for q in asked)
    print(f"left/right: {hits} of {len(asked)}")
    assert len(asked) >= 10 and hits >= 0.75 * len(asked), (hits, len(asked))


def test_the_default_is_small_and_names_its_training(held_out):
    import json

    files = [p for p in DEFAULT_QA_CHECKPOINT.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    run = json.loads((DEFAULT_QA_CHECKPOINT / "training_run.json").read_text())
    assert run["stage"] == 2 and run["recipe"]["init_from"] and run["global_step"] == run["recipe"]["max_steps"]
