"""``python -m training.cold_items`` end to end: the committed fused default on MovieLens-100K (a few
users), cold targets given a rule's vector, fused and alone rows from the same forwards; and the
neutral retriever score of a cold candidate."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.cold_items import main, neutral_cold_scores

REPO = Path(__file__).resolve().parents[1]


def test_the_fused_default_is_reported_fused_and_alone_for_each_rule(tmp_path):
    out = tmp_path / "cold.json"
    student = REPO / "checkpoints" / "student"
    argv = ["--checkpoint", str(student), "--sasrec", str(REPO / "checkpoints" / "sasrec"), "--users", "6",
            "--rules", "warm", "zeros", "--threads", "1", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    gate = float(load_file(student / "ranker_head.safetensors")["fusion_gate"])
    assert abs(report["fusion_gate"] - gate) < 1e-6 and report["users"] == 6
    rows = {(r["rule"], r["scores"]): r for r in report["rows"]}
    assert set(rows) == {(rule, view) for rule in ("warm", "zeros") for view in ("fused", "alone")}
    for row in rows.values():
        assert 0 <= row["hr@1"] <= row["hr@5"] <= 1 and 1 <= row["mean_rank"] <= 20
    assert report["best_mean_rank"] == report["best_hr@1"] == "zeros"  # the one cold rule, read by the student alone
    markdown = out.with_suffix(".md").read_text()
    assert f"A fused ranker (gate {gate:.4g})" in markdown and "| zeros | alone |" in markdown


def test_neutral_cold_scores_put_a_cold_candidate_at_its_lists_warm_mean():
    scores = torch.tensor([[1.0, 2.0, 6.0, 9.0], [3.0, 5.0, 7.0, 0.0]])
    cold = torch.tensor([[False, False, True, False], [True, True, True, True]])
    out = neutral_cold_scores(scores, cold)
    assert torch.equal(out[0], torch.tensor([1.0, 2.0, 4.0, 9.0]))  # (1 + 2 + 9) / 3
    assert torch.equal(out[1], scores[1])  # no warm candidate: unchanged
