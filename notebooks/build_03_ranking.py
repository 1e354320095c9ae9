"""Write notebooks/03_ranking.ipynb (unexecuted; the test suite executes it).

    .venv/bin/python notebooks/build_03_ranking.py
"""

from nbformat.v4 import new_code_cell, new_markdown_cell
from notebook_builder import write_notebook

CELLS = [
    new_markdown_cell("""# Ranking with the textual teacher and the embedding-token student

The default checkpoints in `checkpoints/` (see the README for how they were trained):

* **teacher** — SmolLM2-135M-Instruct + LoRA + a score head; reads the user's last 10 movies and every
  candidate as text;
* **student** (the served default) — the same base model + its own LoRA + score head; each movie is
  **one** embedding token projected from its MiniLM text embedding and its SASRec item embedding, the
  last 10 movies as item tokens and the last 50 summarised into **4 user tokens** (User-LLM), trained
  with labels on every sliding window of the training sequences (97,171 lists, 2.6 epochs on a lent
  GPU); its score is **fused** with SASRec's
  (`scale * student + gate * SASRec`, the two numbers fitted on the validation lists by
  `python -m training.fit_fusion`). Its score alone is the fused score minus the gated SASRec term.

Both score all candidates of a request in one forward (a block attention mask lets each candidate
see the user prefix and itself only). Below: one user's 20 candidates ranked by both, the prompt
lengths, how the student agrees with the teacher over a few users, and where the student wins and
loses against SASRec."""),
    new_code_cell("""from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from mixllm.baselines.sasrec import SASRec
from mixllm.data import PROTOCOLS, get_candidates, leave_one_out, load_dataset
from mixllm.data.evaluation import make_batch
from mixllm.ranking import ItemCatalog, MixLLMRanker, ProtocolRanker
from mixllm.retrieval import FaissRetriever

torch.set_num_threads(2)
pd.set_option("display.width", 200)
pd.set_option("display.max_colwidth", 60)
CHECKPOINTS = Path("..") / "checkpoints"
dataset = load_dataset("ml-100k")
split = leave_one_out(dataset)
lists = get_candidates(split, PROTOCOLS["sampled-20"], "test", seed=0)  # the evaluation's cached lists
sasrec = SASRec.from_pretrained(CHECKPOINTS / "sasrec").eval()
retriever = FaissRetriever(sasrec)  # the fused student adds its gated scores
teacher = MixLLMRanker.from_pretrained(CHECKPOINTS / "teacher", ItemCatalog(texts=dataset.item_texts))
student = MixLLMRanker.from_pretrained(CHECKPOINTS / "student", ItemCatalog(texts=dataset.item_texts))
gate = float(student.fusion_gate) if student.fusion_gate is not None else 0.0
teacher_protocol = ProtocolRanker(teacher, "teacher", batch_size=8)
student_protocol = ProtocolRanker(student, "student", batch_size=32, retriever=retriever if gate else None)
print("teacher:", teacher.mode, "H", teacher.max_history, "| student:", student.mode, "H", student.max_history,
      "user tokens over", student.user_max_history, "items, fusion gate", round(gate, 4))


def test_batch(model, users):
    users = np.asarray(users)
    return make_batch(split, "test", users, model.max_history, lists.candidates[users])


def student_scores(users) -> tuple[np.ndarray, np.ndarray]:
    # (fused, alone) scores of the users' 20 test candidates: alone = fused - gate * SASRec score
    batch = test_batch(student_protocol, users)
    with torch.inference_mode():
        fused = student_protocol.score(batch).float()
        r = retriever.candidate_scores(batch.history[:, -sasrec.config.max_history :], batch.candidates).float()
    return fused.numpy(), student.unfused(fused, r).numpy()"""),
    new_markdown_cell("""## One user, 20 candidates"""),
    new_code_cell("""user = 0
target = lists.candidates[user][lists.target_index[user]]
with torch.inference_mode():
    t_scores = teacher_protocol.score(test_batch(teacher_protocol, [user]))[0].numpy()
s_scores, s_alone = (s[0] for s in student_scores([user]))
request = teacher_protocol.requests(test_batch(teacher_protocol, [user]))[0]
print("history (oldest first, the teacher's 10):")
for i in request.history:
    print("  ", dataset.item_texts[i])
table = pd.DataFrame({
    "movie": [dataset.item_texts[i] for i in request.candidates],
    "held-out target": ["<-" if i == target else "" for i in request.candidates],
    "teacher score": t_scores.round(2), "teacher rank": (-t_scores).argsort().argsort() + 1,
    "student alone": s_alone.round(2), "student + SASRec": s_scores.round(2),
    "student rank": (-s_scores).argsort().argsort() + 1,
}).sort_values("teacher rank")
table"""),
    new_markdown_cell("""## Prompt length

The teacher pays ~16 tokens per movie title (plus its separators) for every history item and every
candidate; the student pays one token per movie, plus its 4 user tokens."""),
    new_code_cell("""t_tokens = teacher.prepare([request]).num_tokens[0]
s_request = student_protocol.requests(test_batch(student_protocol, [user]))[0]
s_tokens = student.prepare([s_request]).num_tokens[0]
print(f"teacher prompt: {t_tokens} tokens, student prompt: {s_tokens} tokens -> {t_tokens / s_tokens:.1f}x fewer")
print(repr(teacher.processor.tokenizer.decode(teacher.prepare([request]).input_ids[0][:80])) + " ...")
print(repr(student.processor.tokenizer.decode(student.prepare([s_request]).input_ids[0])))"""),
    new_markdown_cell("""## Teacher–student agreement

Scores of both models on the 20-candidate test lists of the first users: per-list Spearman rank
correlation, how often both put the same movie first, and each model's HR@1 on these users. The full
evaluation, speed included (measured side by side), is `mixllm eval ranker`: see
`reports/ml100k_rankers.md`."""),
    new_code_cell("""USERS = 24
with torch.inference_mode():
    T = teacher_protocol.score(test_batch(teacher_protocol, range(USERS))).numpy()
S_fused, S = student_scores(range(USERS))  # the student alone is what is compared with the teacher

def spearman(a, b):
    ra, rb = a.argsort().argsort(), b.argsort().argsort()
    return np.corrcoef(ra, rb)[0, 1]

rho = np.array([spearman(t, s) for t, s in zip(T, S)])
targets = lists.target_index[:USERS]
print(f"Spearman rho per list (student alone): median {np.median(rho):.2f} (min {rho.min():.2f}, max {rho.max():.2f})")
print(f"same top-1 movie: {(T.argmax(1) == S.argmax(1)).mean():.2f} of lists")
print(f"HR@1 on these {USERS} users: teacher {(T.argmax(1) == targets).mean():.2f}, "
      f"student alone {(S.argmax(1) == targets).mean():.2f}, fused {(S_fused.argmax(1) == targets).mean():.2f}"
      "  (24 users: a wide error bar; see the report for all)")"""),
    new_code_cell("""def standardize(x):
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-8)

fig, ax = plt.subplots(figsize=(5, 5))
zt, zs = standardize(T), standardize(S)
is_target = np.zeros_like(T, dtype=bool)
is_target[np.arange(USERS), targets] = True
ax.scatter(zt[~is_target], zs[~is_target], s=8, alpha=0.4, label="negatives")
ax.scatter(zt[is_target], zs[is_target], s=30, color="crimson", label="held-out target")
ax.set_xlabel("teacher score (standardized per list)")
ax.set_ylabel("student score (standardized per list)")
ax.set_title(f"Teacher vs student, {USERS} users x 20 candidates")
ax.legend()
plt.show()
assert np.isfinite(T).all() and np.isfinite(S).all()"""),
    new_markdown_cell("""## Where the student wins and loses against SASRec

SASRec (`checkpoints/sasrec`, H = 50) is the retriever the student reranks behind and the baseline it
must beat. All three score the 20 sampled test candidates (seed 0) of the first 300 users (the notebook
runs in the test suite on a 2-core CPU; `mixllm eval ranker` scores all 943 on three candidate seeds):
SASRec, the student alone, and the served fused student. Users are grouped by how long their training
history is and by how popular their held-out movie is (training interactions), in quartiles. Per group:
each model's HR@1 and the paired difference (fused student - SASRec), with its 95% bootstrap interval
over the group's users (`mixllm.stats.paired_bootstrap`)."""),
    new_code_cell("""from mixllm.metrics import ranking_metrics
from mixllm.stats import paired_bootstrap

users = np.arange(300)
target_index = torch.from_numpy(lists.target_index[users])


def hits_of(scores) -> np.ndarray:
    return ranking_metrics(torch.as_tensor(scores).float(), target_index, ("hr@1",))["hr@1"].numpy()


fused, alone = student_scores(users)
with torch.inference_mode():
    sasrec_scores = sasrec.score(test_batch(sasrec, users))
history_len = np.array([len(split.train_sequence(u)) for u in users])
popularity = split.train_item_counts()[split.targets("test")[users]]
frame = pd.DataFrame({"fused": hits_of(fused), "alone": hits_of(alone), "SASRec": hits_of(sasrec_scores),
                      "history length": pd.qcut(history_len, 4, duplicates="drop"),
                      "target popularity": pd.qcut(popularity, 4, duplicates="drop")})
print(f"all {len(users)} users: HR@1 student + SASRec {frame.fused.mean():.3f}, student alone {frame.alone.mean():.3f}, "
      f"SASRec {frame.SASRec.mean():.3f}")

def by_group(column):
    rows = []
    for group, part in frame.groupby(column, observed=True):
        diff = paired_bootstrap(part.fused.to_numpy(), part.SASRec.to_numpy(), resamples=2000)
        rows.append({column: str(group), "users": len(part), "student alone HR@1": part.alone.mean(),
                     "student + SASRec HR@1": part.fused.mean(), "SASRec HR@1": part.SASRec.mean(),
                     "fused - SASRec": diff.mean, "95% interval": f"[{diff.low:+.3f}, {diff.high:+.3f}]"})
    return pd.DataFrame(rows).round(3)

groups = {column: by_group(column) for column in ("history length", "target popularity")}
groups["history length"]"""),
    new_code_cell("""groups["target popularity"]"""),
    new_code_cell("""fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), sharey=True)
for ax, (column, table) in zip(axes, groups.items()):
    x = np.arange(len(table))
    for offset, name in ((-0.27, "student alone HR@1"), (0.0, "student + SASRec HR@1"), (0.27, "SASRec HR@1")):
        ax.bar(x + offset, table[name], 0.27, label=name.removesuffix(" HR@1"))
    ax.set_xticks(x, table[column], rotation=20, fontsize=8)
    ax.set_xlabel(f"{column} (quartile)")
axes[0].set_ylabel("HR@1, sampled-20 test")
axes[0].legend()
plt.tight_layout()
plt.show()
assert sum(len(t) for t in groups.values()) >= 2 and all(t.users.sum() == len(users) for t in groups.values())
# fusion with a positive gate never reads SASRec's scores upside down: the fused student is closer to SASRec
assert gate == 0 or (frame.fused == frame.SASRec).mean() >= (frame.alone == frame.SASRec).mean() - 0.05"""),
]


def main() -> None:
    write_notebook(CELLS, "03_ranking.ipynb")


if __name__ == "__main__":
    main()
