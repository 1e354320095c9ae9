"""``mixllm eval caption``: held-out image question answering on the scenes, beside its baselines.

For every held-out scene each of its questions is asked alone (image + one question, greedy) and the
answer is scored by exact match after normalisation (case, surrounding space and final punctuation). Per
question type the report gives the model's accuracy beside

- the **majority answer** of that type in the training split (what a model that ignores the image can do),
- the **image zeroed**: the same model with the vision features replaced by zeros (answers that still come
  out right did not need the image),
- **zero-shot**: the same architecture with an untrained projector and no adapters,

and the caption loss (mean cross-entropy per caption token, LLaVA's stage-1 loss; the default stage 1
aligns by cells instead) of the trained and the untrained projector on the held-out captions. Finer
groups (:func:`answer_group`: position by the axis asked, yes/no by the right answer) show where a type's
misses fall. ``--speed`` adds time to first token for one question
(model loaded, image decoding and the vision tower included, median of 10).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from mixllm.conversation import question_prompt
from mixllm.data.llava import Conversation, load_llava_conversations
from mixllm.errors import MixLLMError
from mixllm.provenance import atomic_write_text, git_revision, machine_info

log = logging.getLogger(__name__)


def normalize(answer: str) -> str:
    return re.sub(r"[\s.!?,;:]+$", "", answer.strip().lower()).strip()


def single_questions(conversations: list[Conversation], image_token: str) -> list[dict]:
    """Each (question, answer) turn of each conversation as its own question about the image."""
    out = []
    for row, conv in enumerate(conversations):
        types = conv.question_types or ["?"] * len(conv.turns)
        for (question, answer), qtype in zip(conv.turns, types):
            text = question.replace(image_token, "").strip()
            out.append({"id": conv.id, "row": row, "question": text, "answer": answer, "type": qtype})
    return out


def _on(model, batch: dict) -> dict:
    """``batch``'s tensors on ``model``'s device."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def batch_answers(model, processor, questions: list[str], vision_features: torch.Tensor | None = None,
                  pixel_values: torch.Tensor | None = None, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to one question per image, all in one left-padded batch."""
    tokenizer = processor.tokenizer
    prompts = [question_prompt(tokenizer, q, processor.token("image")) for q in questions]
    batch = _on(model, processor(prompts, images=pixel_values, vision_features=vision_features, padding_side="left"))
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.pad_token_id)
    return [text.strip() for text in processor.batch_decode(out)]


def accuracy_by_type(questions: list[dict], answers: list[str]) -> dict[str, dict]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for q, a in zip(questions, answers):
        hits[q["type"]].append(normalize(a) == normalize(q["answer"]))
    return {t: {"accuracy": sum(h) / len(h), "n": len(h)} for t, h in sorted(hits.items())}


def answer_group(question: dict) -> str | None:
    """The finer group a question is reported in, from its expected answer: a position question by its
    axis ("position left/right", "position top/bottom"), a yes/no question by its answer ("yesno yes",
    "yesno no"); None for the other types."""
    answer = normalize(question["answer"])
    if question["type"] == "position":
        return "position left/right" if answer in ("left", "right") else "position top/bottom"
    if question["type"] == "yesno":
        return f"yesno {answer}"
    return None


def accuracy_by_group(questions: list[dict], answers: list[str]) -> dict[str, dict]:
    """:func:`accuracy_by_type` over :func:`answer_group` (questions outside a group are left out)."""
    grouped = [(dict(q, type=g), a) for q, a in zip(questions, answers) if (g := answer_group(q)) is not None]
    return accuracy_by_type([q for q, _ in grouped], [a for _, a in grouped])


def majority_answers(train_json: Path, image_token: str) -> dict[str, str]:
    conversations, _ = load_llava_conversations(train_json, check_images=False, image_token=image_token)
    counts: dict[str, Counter] = defaultdict(Counter)
    for q in single_questions(conversations, image_token):
        counts[q["type"]][normalize(q["answer"])] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def caption_loss(model, processor, conversations: list[Conversation], features: torch.Tensor, batch_size: int) -> float:
    """Mean cross-entropy per supervised caption token (answer tokens + end of turn)."""
    from training.caption import CaptionCollator, ConversationEncoder, answer_loss

    encoder = ConversationEncoder(processor.tokenizer, processor.num_tokens["image"], processor.token_ids["image"])
    samples = encoder.samples(conversations)
    collate = CaptionCollator(processor, features)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = _on(model, collate(samples[start : start + batch_size]))
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(answer_loss(model, batch)) * n
            tokens += n
    return total / tokens


def untrained_twin(model):
    """The same architecture with a fresh projector and no adapters (seeded): the zero-shot baseline."""
    from mixllm.config import MixLLMConfig
    from mixllm.loading import build

    config = MixLLMConfig.from_dict(model.config.to_dict())
    config.lora = None
    torch.manual_seed(0)
    return build(config)


def time_to_first_token(model, processor, image_path: Path, question: str, repeats: int = 10) -> list[float]:
    from mixllm.data.llava import load_image

    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        pixels = processor.image_processor([load_image(image_path)])
        batch_answers(model, processor, [question], pixel_values=pixels, max_new_tokens=1)
        times.append(time.perf_counter() - start)
    return times[1:]  # the first call warms up


def evaluate_caption(model_dir: Path, scenes: Path, max_scenes: int, batch_size: int, speed: bool,
                     progress: bool = True, device: torch.device = torch.device("cpu")) -> dict:
    from tqdm.auto import tqdm

    from mixllm.assets import mixllm_home
    from mixllm.loading import from_pretrained
    from mixllm.lora import merge_lora
    from training.vision_cache import cached_vision_features

    model, processor = from_pretrained(model_dir)
    merge_lora(model.language_model)
    image_token = processor.token("image")
    test, report = load_llava_conversations(scenes / "test_qa.json", image_token=image_token)
    test = test[:max_scenes]
    captions, _ = load_llava_conversations(scenes / "test_captions.json", image_token=image_token)
    captions = captions[:max_scenes]
    questions = single_questions(test, image_token)
    cache = mixllm_home() / "vision_features"
    feats = cached_vision_features(model.encoders["image"], processor.image_processor, [c.image for c in test], cache, progress=progress)
    cap_feats = cached_vision_features(model.encoders["image"], processor.image_processor, [c.image for c in captions], cache, progress=progress)
    majority = majority_answers(scenes / "train_qa.json", image_token)
    twin, _ = untrained_twin(model)
    model.to(device)  # fp32 on either device; the features stay on the CPU until a batch moves
    twin.to(device)

    def run(m, zero: bool) -> list[str]:
        answers = []
        for start in tqdm(range(0, len(questions), batch_size), desc="answers", disable=not progress):
            chunk = questions[start : start + batch_size]
            rows = feats[torch.tensor([q["row"] for q in chunk])].float()
            answers += batch_answers(m, processor, [q["question"] for q in chunk], vision_features=torch.zeros_like(rows) if zero else rows)
        return answers

    start = time.perf_counter()
    answers = run(model, zero=False)
    answer_time = time.perf_counter() - start
    conditions = {"model": answers, "image_zeroed": run(model, zero=True), "zero_shot": run(twin, zero=False)}
    result = {
        "model_dir": str(model_dir), "scenes": str(scenes), "test_scenes": len(test), "questions": len(questions),
        "types": {}, "caption_loss": {"model": caption_loss(model, processor, captions, cap_feats, batch_size),
                                      "zero_shot": caption_loss(twin, processor, captions, cap_feats, batch_size)},
        "answer_seconds_per_question": answer_time / len(questions),
        "examples": [{**q, "predicted": a} for q, a in list(zip(questions, answers))[:20]],
        "failures": [{**q, "predicted": a, "image": str(test[q["row"]].image)} for q, a in zip(questions, answers)
                     if normalize(a) != normalize(q["answer"])][:40],
        "training_run": _training_record(model_dir), "machine": machine_info(), "git_revision": git_revision(),
        "device": _device_name(device),
    }  # fmt: skip
    by_condition = {name: accuracy_by_type(questions, ans) for name, ans in conditions.items()}
    for qtype in sorted(by_condition["model"]):
        typed = [q for q in questions if q["type"] == qtype]
        result["types"][qtype] = {
            "n": len(typed), **{name: by_condition[name][qtype]["accuracy"] for name in conditions},
            "majority": sum(normalize(q["answer"]) == majority.get(qtype) for q in typed) / len(typed),
            "majority_answer": majority.get(qtype),
        }  # fmt: skip
    by_group = {name: accuracy_by_group(questions, ans) for name, ans in conditions.items()}
    result["groups"] = {group: {"n": row["n"], **{name: by_group[name][group]["accuracy"] for name in conditions}}
                        for group, row in by_group["model"].items()}  # fmt: skip
    result["overall"] = {name: sum(normalize(a) == normalize(q["answer"]) for q, a in zip(questions, ans)) / len(questions)
                         for name, ans in conditions.items()}  # fmt: skip
    if speed:
        ttft = time_to_first_token(model, processor, test[0].image, questions[0]["question"])
        result["time_to_first_token_s"] = {"median": statistics.median(ttft), "runs": ttft, "threads": torch.get_num_threads()}
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _training_record(model_dir: Path) -> dict | None:
    path = model_dir / "training_run.json"
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    return {k: run.get(k) for k in ("stage", "global_step", "train_time_s", "precision", "machine", "data")}


def markdown(result: dict) -> str:
    lines = [
        "# Image QA on held-out scenes (`mixllm eval caption`)", "",
        f"{result['test_scenes']} test scenes, {result['questions']} questions, one question per prompt, greedy, "
        "exact match after normalisation.", "",
        "| question type | n | model | majority answer | image zeroed | zero-shot (untrained projector) |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for qtype, row in result["types"].items():
        lines.append(f"| {qtype} | {row['n']} | {row['model']:.3f} | {row['majority']:.3f} ({row['majority_answer']}) | "
                     f"{row['image_zeroed']:.3f} | {row['zero_shot']:.3f} |")  # fmt: skip
    o = result["overall"]
    lines.append(f"| **all** | {result['questions']} | {o['model']:.3f} | | {o['image_zeroed']:.3f} | {o['zero_shot']:.3f} |")
    if result.get("groups"):
        lines += ["", "Finer groups (position by the axis asked, yes/no by the right answer):", "",
                  "| group | n | model | image zeroed |", "|---|---|---|---|"]
        lines += [f"| {group} | {row['n']} | {row['model']:.3f} | {row['image_zeroed']:.3f} |"
                  for group, row in result["groups"].items()]
    loss = result["caption_loss"]
    lines += ["", f"Caption loss on the test captions (cross-entropy per token): model {loss['model']:.3f}, "
              f"untrained projector {loss['zero_shot']:.3f}."]  # fmt: skip
    if "time_to_first_token_s" in result:
        t = result["time_to_first_token_s"]
        lines.append(f"Time to first token (model loaded, one image + question, median of {len(t['runs'])}): "
                     f"{t['median'] * 1000:.0f} ms on {t['threads']} threads"
                     f"{'' if result.get('device', 'cpu') == 'cpu' else ' and the GPU'}.")  # fmt: skip
    machine = result["machine"]
    lines.append(f"Machine: {machine.get('cpu', machine.get('processor'))}, {machine.get('cpu_count')} cores; "
                 f"model on {result.get('device', 'cpu')}; revision {result['git_revision']}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def cli_eval_caption(args) -> int:
    from mixllm.qa import DEFAULT_QA_CHECKPOINT

    model_dir = Path(args.model) if args.model else DEFAULT_QA_CHECKPOINT
    if not (model_dir / "mixllm_config.json").is_file():
        raise MixLLMError(f"--model: {model_dir} is not a mixllm checkpoint (train one: make caption)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scenes:
        scenes = Path(args.scenes)
    else:
        from training.caption import CaptionRecipe, data_files

        recipe = CaptionRecipe.from_yaml(args.config)
        _, scenes = data_files(recipe, "test")
    if not (scenes / "test_qa.json").is_file():
        raise MixLLMError(f"--scenes: {scenes} has no test_qa.json")
    from mixllm.loading import resolve_device

    result = evaluate_caption(model_dir, scenes, args.max_scenes, args.batch_size, args.speed,
                              progress=not args.no_progress, device=resolve_device(args.device))
    output = Path(args.output)
    atomic_write_text(output, json.dumps(result, indent=2))
    atomic_write_text(output.with_suffix(".md"), markdown(result))
    print(markdown(result))
    print(f"report: {output} (+ .md)")
    return 0
