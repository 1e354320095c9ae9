"""Write notebooks/04_image_qa.ipynb (unexecuted; the test suite executes it).

    .venv/bin/python notebooks/build_04_image_qa.py

The notebook reads the committed checkpoint ``checkpoints/scenes_qa`` (its training logs under ``logs/``)
and ``reports/scenes_qa.json``; the held-out scenes are regenerated from the scene generator, so neither
``runs/`` nor ``$MIXLLM_HOME/scenes`` needs to exist. ``MIXLLM_NB_QA_MODEL=DIR`` points it at another
mixllm checkpoint with an image modality.
"""

from nbformat.v4 import new_code_cell, new_markdown_cell
from notebook_builder import write_notebook

CELLS = [
    new_markdown_cell("""# Image question answering on synthetic scenes

The default image QA model in `checkpoints/scenes_qa` (what `mixllm ask` and the service's
`/v1/chat/completions` answer with) is LLaVA's recipe at a small scale:

* **vision tower** — EfficientNet-Lite0, frozen. A 224x224 image gives the outputs of two of its inner
  blocks side by side on a 7x7 grid (block 7's 80 channels, average-pooled from 14x14, and block 14's 192):
  **49 visual tokens** of 272 numbers, one per 32-px cell. Its last layer (1280 channels) was the first
  choice, but it has lost most of the colour (`reports/vision_probe.md`);
* **projector** — a 2-layer GELU MLP that maps each of the 49 vectors into the embedding space of the
  language model; the 49 projected vectors take the place of the `<image>` placeholder in the prompt;
* **language model** — SmolLM2-135M-Instruct, frozen, with LoRA adapters (rank 8 on every linear layer of its
  attention and MLP blocks).

Training follows LLaVA's two stages on the built-in scenes (`mixllm.data.scenes`: 1-4 coloured shapes
on a neutral background, each with a caption and up to five questions):

1. **feature alignment** — only the projector trains, on captions ("Two shapes: a red circle at the top
   left and ..."), with the tower and the language model frozen;
2. **instruction tuning** — the projector (starting from stage 1) and the LoRA adapters train on the
   question-answer pairs, each question as if it were asked alone (the image is shared by a scene's
   questions, but no question sees another's).

Both stages put the loss on the answer tokens only. Below: the scenes, both stages' loss curves, answers
on held-out images, where the model fails, and what it answers when the image is taken away. The
numbers over the full held-out set are in `reports/scenes_qa.md` (`mixllm eval caption`) and the README."""),
    new_code_cell("""%matplotlib inline
import json
import os
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from mixllm.data.scenes import COLOURS, QA, QUESTION_TYPES, SHAPES, caption, derived_rng, generate_split, render_scene, scene_records
from mixllm.generation import GenerationSettings
from mixllm.qa import QAModel, user_message
from training.caption_eval import batch_answers, normalize

torch.set_num_threads(2)
pd.set_option("display.width", 200)
pd.set_option("display.max_colwidth", 60)
MODEL_DIR = Path(os.environ.get("MIXLLM_NB_QA_MODEL", "../checkpoints/scenes_qa"))
REPORT = Path("..") / "reports" / "scenes_qa.json"
SEED = 0  # the scene seed of the training recipes (training/configs/caption_stage*.yaml)
TEST_SCENES = generate_split("test", 200, SEED)  # the first 200 held-out scenes (`mixllm eval caption`'s default)


def held_out(i: int):
    \"\"\"Test scene i (0-based; its dataset id is test-{i+1:06d}): the scene, its image and its questions,
    exactly as `write_scenes` writes them (same per-scene rng), in QUESTION_TYPES order.\"\"\"
    scene = TEST_SCENES[i] if i < len(TEST_SCENES) else generate_split("test", i + 1, SEED)[i]
    _, record = scene_records(scene, f"test-{i + 1:06d}", "", derived_rng(SEED, "test", i + 1))
    turns = record["conversations"]
    qas = [QA(t, turns[2 * k]["value"].replace("<image>\\n", ""), turns[2 * k + 1]["value"])
           for k, t in enumerate(record["question_types"])]
    return scene, render_scene(scene), sorted(qas, key=lambda qa: QUESTION_TYPES.index(qa.type))


def brief(answer: str, width: int = 24) -> str:
    \"\"\"An answer on one short line (an untrained model can ramble).\"\"\"
    return textwrap.shorten(answer, width, placeholder="...") or repr(answer)


def show(ax, image, title, lines):
    \"\"\"An image, a wrapped title above it and (text, colour) lines below it.\"\"\"
    ax.imshow(image)
    ax.set_title("\\n".join(textwrap.wrap(title, 42)), fontsize=8)
    ax.axis("off")
    for k, (text, colour) in enumerate(lines):
        ax.text(0, -0.04 - 0.085 * k, text, transform=ax.transAxes, va="top", fontsize=7.5, color=colour)"""),
    new_markdown_cell("""## The scenes

Eight held-out test scenes (the generator assigns every scene layout to one split, so none of these
appears in training) with their captions (stage 1's targets) and their questions and answers (stage
2's): the colour of a shape, the shape of a colour, the number of shapes, the side a shape is on, and a
yes/no question whose "no" is a near miss (a colour that is there, on a shape that is not)."""),
    new_code_cell("""fig, axes = plt.subplots(2, 4, figsize=(16, 9.5))
for i, ax in enumerate(axes.flat):
    scene, image, qas = held_out(i)
    show(ax, image, caption(scene), [(f"{qa.question}  {qa.answer}", "black") for qa in qas])
fig.subplots_adjust(hspace=0.75, wspace=0.2)
plt.show()"""),
    new_markdown_cell("""## The model

`QAModel.load` is what `mixllm ask` runs: the mixllm checkpoint, its LoRA adapters merged into the
language model's weights. One question through `complete` (the streaming path of the service), greedy:"""),
    new_code_cell("""qa = QAModel.load(MODEL_DIR)
encoder = qa.model.encoders["image"]
print(f"{MODEL_DIR}: {qa.model.num_tokens['image']} image tokens "
      f"(tower {encoder.tower_tokens} x {encoder.output_dim}), language model hidden size "
      f"{qa.model.language_model.config.get_text_config().hidden_size}")

scene, image, qas = held_out(0)
completion = qa.complete([user_message(qas[0].question)], [image], GenerationSettings(max_new_tokens=8))
answer = "".join(completion).strip()
print(f"Q: {qas[0].question}  A: {answer!r} (true: {qas[0].answer!r}); "
      f"{completion.prompt_tokens} prompt tokens, {completion.completion_tokens} generated, {completion.finish_reason}")"""),
    new_markdown_cell("""## Training curves

Training loss (every few steps) and validation loss (a fixed slice of the validation scenes) of both
stages, as Lightning's CSV logger wrote them (`logs/stage{1,2}_metrics.csv` beside the checkpoint):
stage 1's loss is on caption tokens, stage 2's on answer tokens, so the two scales differ."""),
    new_code_cell("""LOGS = MODEL_DIR / "logs"
stages = {1: LOGS / "stage1_metrics.csv", 2: LOGS / "stage2_metrics.csv"}
if not all(p.is_file() for p in stages.values()):
    print(f"no training logs under {LOGS} (a checkpoint without them): no curves")
else:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for (stage, path), ax, what in zip(stages.items(), axes, ("captions: projector only", "answers: projector + LoRA")):
        metrics = pd.read_csv(path)
        for column, style in (("train/loss", "-"), ("val/loss", "o-")):
            if column in metrics:
                rows = metrics.dropna(subset=[column])
                ax.plot(rows["step"], rows[column], style, label=column.split("/")[0])
        ax.set_title(f"stage {stage} ({what})")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy per target token")
        ax.grid(alpha=0.3)
        ax.legend()
    plt.show()

runs = {1: LOGS / "stage1_training_run.json", 2: MODEL_DIR / "training_run.json"}
records = {}
for stage, path in runs.items():
    if path.is_file():
        run = json.loads(path.read_text())
        records[f"stage {run.get('stage', stage)}"] = {
            "steps": run.get("global_step"), "train minutes": round(run.get("train_time_s", float("nan")) / 60, 1),
            "precision": run.get("precision"), "samples": (run.get("data") or {}).get("train_used"),
            **{k: round(v, 3) for k, v in (run.get("metrics") or {}).items() if "loss" in k},
        }
pd.DataFrame(records).T if records else print("no training_run.json found")"""),
    new_markdown_cell("""## Answers on held-out images

Every question of twelve held-out scenes, one question per prompt (image + question, as in
`mixllm ask`), greedy, in one left-padded batch. The vision tower runs once per image; its 7x7 grid of
features is reused for every question about that image. An answer counts as right on an exact match
after normalisation (case, surrounding space, final punctuation), as in `mixllm eval caption`. The first
six scenes, wrong answers in red:"""),
    new_code_cell("""N_SCENES = 12
live = [held_out(i) for i in range(N_SCENES)]
with torch.no_grad():
    features = encoder.tower_features(qa.processor.image_processor([image for _, image, _ in live]))  # (N, 49, 272)
rows = [(k, q) for k, (_, _, qas) in enumerate(live) for q in qas]
row_index = torch.tensor([k for k, _ in rows])
answers = batch_answers(qa.model, qa.processor, [q.question for _, q in rows], vision_features=features[row_index])
results = pd.DataFrame({
    "scene": [f"test-{k + 1:06d}" for k, _ in rows], "type": [q.type for _, q in rows],
    "question": [q.question for _, q in rows], "answer": [q.answer for _, q in rows], "model": answers,
})
results["right"] = [normalize(a) == normalize(q.answer) for (_, q), a in zip(rows, answers)]

fig, axes = plt.subplots(2, 3, figsize=(15, 10.5))
for k, ax in enumerate(axes.flat):
    scene, image, _ = live[k]
    mine = results[results["scene"] == f"test-{k + 1:06d}"]
    show(ax, image, f"test-{k + 1:06d}: {caption(scene)}", [("question  true | model", "grey")]
         + [(f"{r.question}  {r.answer} | {brief(r.model)}" + ("" if r.right else "  (wrong)"), "black" if r.right else "crimson")
            for r in mine.itertuples()])
fig.subplots_adjust(hspace=0.75, wspace=0.1)
plt.show()
print(f"{results['right'].sum()} of {len(results)} right on these {N_SCENES} scenes")
results.groupby("type", sort=False)["right"].agg(["mean", "size"]).rename(columns={"mean": "accuracy", "size": "n"})"""),
    new_markdown_cell("""## Where it fails

Per question type over the full held-out evaluation (`reports/scenes_qa.json`, written by
`mixllm eval caption`), the model beside what needs no image: the most frequent training answer of the
type (*majority*), the same model with the image features replaced by zeros (*image zeroed*), and the
untrained projector without adapters (*zero-shot*)."""),
    new_code_cell("""report = json.loads(REPORT.read_text()) if REPORT.is_file() else None
if report is None:
    print(f"{REPORT} is not there (run `mixllm eval caption`): no full-evaluation table")
else:
    columns = ["n", "model", "majority", "majority_answer", "image_zeroed", "zero_shot"]
    table = pd.DataFrame.from_dict(report["types"], orient="index")[columns]
    table.loc["all"] = {"n": report["questions"], **report["overall"]}
    print(f"{report['test_scenes']} test scenes, {report['questions']} questions; caption loss: "
          + ", ".join(f"{k} {v:.3f}" for k, v in report["caption_loss"].items()))
    display(table.round(3))"""),
    new_markdown_cell("""Every wrong answer among the live questions above, and the failures the report keeps (its first
few) on later scenes, those scenes regenerated from the generator (the report's image paths point into
`$MIXLLM_HOME`, which need not exist here). Sorted by the kind of mistake: for a colour or shape
question, whether the answer names something that *is* in the scene (the attribute of another object) or
something that is not; for a count, how far off; for yes/no, which way."""),
    new_code_cell("""def mistake(scene, qtype: str, predicted: str) -> str:
    p = normalize(predicted)
    if qtype in ("colour", "shape"):
        if p not in (COLOURS if qtype == "colour" else SHAPES):
            return f"not a {qtype}"
        present = {getattr(s, qtype) for s in scene.shapes}  # Shape.colour / Shape.shape
        return f"{qtype} of another object" if p in present else f"{qtype} not in the scene"
    if qtype == "count":
        return f"off by {abs(int(p) - len(scene.shapes))}" if p.isdigit() else "not a number"
    if qtype == "yesno":
        return {"yes": "yes, but absent", "no": "no, but present"}.get(p, "not yes/no")
    return "the other side" if p in ("left", "right", "top", "bottom") else "not a side"


failures = [(r.scene, "live", live[int(r.scene[5:]) - 1], r.type, r.question, r.answer, r.model)
            for r in results[~results["right"]].itertuples()]
unmatched = 0
for f in (report or {}).get("failures", []):
    i = int(f["id"].rsplit("-", 1)[1]) - 1
    if i < N_SCENES:  # asked live above
        continue
    scene, image, qas = held_out(i)
    if not any(q.question == f["question"] and q.answer == f["answer"] for q in qas):  # not the report's scene
        unmatched += 1
    else:
        failures.append((f["id"], "report", (scene, image, qas), f["type"], f["question"], f["answer"], f["predicted"]))
if unmatched:
    print(f"{unmatched} of the report's failures do not match a regenerated scene (another scene seed?): left out")
wrong = pd.DataFrame([(n, src, t, q, a, brief(p), mistake(sc[0], t, p)) for n, src, sc, t, q, a, p in failures],
                     columns=["scene", "from", "type", "question", "true", "model", "mistake"])
print(f"{len(wrong)} wrong answers: {(wrong['from'] == 'live').sum()} of the {len(results)} live ones, "
      f"{(wrong['from'] == 'report').sum()} more from the report's list (scenes after the first {N_SCENES})")
wrong.groupby(["type", "mistake"]).size().rename("wrong answers").to_frame()"""),
    new_markdown_cell("""Up to eight of them with their images, one per scene: the report's first, then the live scenes not
drawn above."""),
    new_code_cell("""shown = []
for f in sorted(failures, key=lambda f: (f[1] == "live", f[1] == "live" and int(f[0][5:]) <= 6)):
    if len(shown) < 8 and f[0] not in {g[0] for g in shown}:
        shown.append(f)
if shown:
    fig, axes = plt.subplots(2, 4, figsize=(16, 8.5), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, (name, _, (scene, image, _), qtype, question, truth, predicted) in zip(axes.flat, shown):
        show(ax, image, f"{name}: {caption(scene)}",
             [(question, "black"), (f"true: {truth} | model: {brief(predicted)}", "crimson"), (mistake(scene, qtype, predicted), "grey")])
    fig.subplots_adjust(hspace=0.6, wspace=0.2)
    plt.show()
wrong.head(20)"""),
    new_markdown_cell("""Reading the table: a question type where the model is far above both the majority answer and the
image-zeroed model is one it answers from the image; a type where it is close to them is one where it
mostly guesses from the question's wording. The mistakes table says which kind of error remains: a
colour or shape "of another object" means the model saw what is in the scene but bound the attribute to
the wrong object; one "not in the scene" means it did not see (or ignored) the image; counts off by one
and yes/no answers that go one way more than the other are worth comparing with the image-zeroed column
above, which shows what the model says with nothing to look at."""),
    new_markdown_cell("""## Without the image

The same questions with the vision features replaced by zeros (the projector still runs, so the 49 image
tokens are the projection of an all-zero grid): what the model says when it cannot see. Most types
fall back to one answer (a colour, a count, "yes" or "no"); shape questions may scatter, some answers
not even shapes. The answers that stay right were guessable from the question alone (a fixed "yes" or
"no" is right about half the time)."""),
    new_code_cell("""zeroed = batch_answers(qa.model, qa.processor, [q.question for _, q in rows],
                       vision_features=torch.zeros_like(features[row_index]))
results["image zeroed"] = zeroed
results["zeroed right"] = [normalize(a) == normalize(q.answer) for (_, q), a in zip(rows, zeroed)]
summary = results.groupby("type", sort=False).agg(
    n=("right", "size"), with_image=("right", "mean"), image_zeroed=("zeroed right", "mean"),
    zeroed_answers=("image zeroed", lambda a: ", ".join(f"{k} ({v})" for k, v in a.map(normalize).value_counts().items())),
)
summary"""),
]


def main() -> None:
    write_notebook(CELLS, "04_image_qa.ipynb")


if __name__ == "__main__":
    main()
