"""`mixllm eval baselines`: train and evaluate the classical baselines on every protocol and seed.

For each seed: popularity (training counts), SASRec (Lightning, early-stopped on validation) and the
MiniLM item-text similarity baseline are scored on the validation and test targets of every
protocol, with the seed's cached candidate lists. The report (JSON + markdown) holds every metric,
split, seed and model, wall times and the machine, plus mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mixllm.baselines import PopularityRanker, TextSimilarityRanker
from mixllm.data import (
    DEFAULT_HISTORY_LENGTH,
    PROTOCOLS,
    SPLITS,
    Ranker,
    default_cache_dir,
    evaluate_protocols,
    get_candidates,
    leave_one_out,
    load_dataset,
)
from mixllm.errors import MixLLMError
from mixllm.features import sasrec_checkpoint_dir
from mixllm.provenance import atomic_write_text, git_revision, machine_info
from mixllm.stats import mean_std
from training.sasrec import SASRecTrainConfig, train_sasrec

log = logging.getLogger(__name__)

MODELS = ("popularity", "sasrec", "minilm-text")
MODEL_LABELS = {"popularity": "Popularity", "sasrec": "SASRec", "minilm-text": "MiniLM text similarity"}


def cli_baselines(args: argparse.Namespace) -> int:
    """Handler of `mixllm eval baselines` (see :func:`run_baselines`)."""
    models = tuple(getattr(args, "models", None) or MODELS)
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise MixLLMError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    report = run_baselines(
        dataset=args.dataset,
        seeds=list(args.seed),
        models=models,
        sasrec_config=SASRecTrainConfig.from_yaml(getattr(args, "config", None) or "sasrec.yaml"),
        cache_dir=getattr(args, "cache_dir", None),
        checkpoint_dir=getattr(args, "checkpoint_dir", None),
        command="mixllm " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("mixllm") else None,
    )
    output = Path(args.output)
    write_report(report, output)
    print(render_markdown(report))
    return 0


def run_baselines(
    dataset: str,
    seeds: list[int],
    models: tuple[str, ...] = MODELS,
    sasrec_config: SASRecTrainConfig | None = None,
    cache_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    command: str | None = None,
) -> dict:
    """Train and evaluate ``models`` for every seed; returns the report dict."""
    start_all = time.perf_counter()
    data = load_dataset(dataset)
    split = leave_one_out(data)
    sasrec_config = sasrec_config or SASRecTrainConfig()
    torch.set_num_threads(sasrec_config.num_threads)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    text_embeddings, text_encode_s = None, None
    if "minilm-text" in models:
        text_embeddings, text_encode_s = _encode_item_texts(data.item_texts)

    runs = []
    for seed in seeds:
        candidates = {
            f"{protocol.name}/{which}": get_candidates(split, protocol, which, seed, cache_dir).digest()
            for protocol in PROTOCOLS.values()
            if not protocol.is_full_ranking
            for which in SPLITS
        }
        for name in models:
            record: dict = {"seed": seed, "model": name, "candidate_digests": candidates}
            ranker: Ranker
            if name == "popularity":
                start = time.perf_counter()
                ranker = PopularityRanker.fit(split)
                record["train_time_s"] = time.perf_counter() - start
            elif name == "sasrec":
                ranker, info = train_sasrec(split, sasrec_config, seed, cache_dir)
                record.update(
                    train_time_s=info["train_time_s"],
                    time_to_best_s=info["time_to_best_s"],
                    best_epoch=info["best_epoch"],
                    epochs=info["epochs"],
                    parameters=info["parameters"],
                    validation_history=info["history"],
                )
            else:
                if text_embeddings is None:
                    continue
                ranker = TextSimilarityRanker(text_embeddings, max_history=DEFAULT_HISTORY_LENGTH)
                record["train_time_s"] = text_encode_s  # no training: the one-off cost is encoding the catalog
            start = time.perf_counter()
            record["metrics"] = evaluate_protocols(ranker, split, seed, cache_dir=cache_dir)
            record["eval_time_s"] = time.perf_counter() - start
            record["max_history"] = ranker.max_history
            if name == "sasrec":
                directory = sasrec_checkpoint_dir(data.name, seed)
                if checkpoint_dir is not None:  # --checkpoint-dir stands for $MIXLLM_HOME/checkpoints
                    directory = Path(checkpoint_dir) / directory.name
                record["checkpoint"] = str(
                    ranker.save_pretrained(
                        directory,
                        provenance={
                            "dataset": data.name,
                            "dataset_fingerprint": data.fingerprint(),
                            "item_index": "row i = item_idx i = dataset.items row i",
                            "seed": seed,
                            "git_revision": git_revision(),
                            "train": {k: v for k, v in info.items() if k != "history"},
                            "metrics": record["metrics"],
                        },
                    )
                )
            log.info(
                "%s seed %d: test full ndcg@10 %.4f (train %.1fs, eval %.1fs)",
                name, seed, record["metrics"]["test"].get("full", {}).get("ndcg@10", float("nan")),
                record["train_time_s"], record["eval_time_s"],
            )  # fmt: skip
            runs.append(record)

    return {
        "dataset": data.name,
        "dataset_stats": data.stats(),
        "dataset_fingerprint": data.fingerprint(),
        "seeds": list(seeds),
        "models": list(models),
        "command": command or f"mixllm eval baselines --dataset {dataset} --seed {' '.join(map(str, seeds))}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "machine": machine_info(),
        "split": {
            "type": "leave-one-out by time (ties by item id)",
            "valid": "second-to-last interaction; history = all earlier items",
            "test": "last interaction; history = all earlier items (validation item included)",
        },
        "protocols": {
            p.name: {"num_candidates": p.num_candidates, "metrics": list(p.metrics)} for p in PROTOCOLS.values()
        },
        "candidate_cache": str(cache_dir),
        "sasrec_config": asdict(sasrec_config),
        "total_time_s": time.perf_counter() - start_all,
        "runs": runs,
        "summary": summarize(runs),
    }


def _encode_item_texts(texts: list[str]) -> tuple[torch.Tensor | None, float | None]:
    """MiniLM embeddings of every item text, or (None, None) when the encoder is unavailable."""
    try:
        from mixllm.encoders.text import SentenceEncoder
    except ImportError as err:  # the encoder module is optional for this command
        log.warning("skipping minilm-text: %s", err)
        return None, None
    start = time.perf_counter()
    encoder = SentenceEncoder.from_pretrained()
    embeddings = encoder.encode(texts, batch_size=64, show_progress=True)
    return embeddings, time.perf_counter() - start


def summarize(runs: list[dict]) -> dict:
    """``{model: {split: {protocol: {metric: {mean, std, n, values}}}}}`` over seeds; std is the
    sample standard deviation (ddof=1; 0 for one seed). Also ``{model: {"times": ...}}``."""
    summary: dict = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        model_runs = [r for r in runs if r["model"] == model]
        entry: dict = {}
        for which in SPLITS:
            entry[which] = {}
            for protocol, metrics in model_runs[0]["metrics"].get(which, {}).items():
                entry[which][protocol] = {
                    metric: _stats([r["metrics"][which][protocol][metric] for r in model_runs]) for metric in metrics
                }
        entry["times"] = {
            key: _stats([r[key] for r in model_runs])
            for key in ("train_time_s", "time_to_best_s", "eval_time_s")
            if all(key in r for r in model_runs)
        }
        entry["max_history"] = model_runs[0]["max_history"]
        summary[model] = entry
    return summary


def _stats(values: list[float]) -> dict:
    """``mixllm.stats.mean_std`` plus the values themselves (the report keeps every seed's)."""
    return {**mean_std(values), "values": [float(v) for v in values]}


# --- report ---------------------------------------------------------------------------------------
TABLE_COLUMNS = (
    ("sampled-20", "hr@1", "20 cand. HR@1"),
    ("sampled-20", "ndcg@5", "20 cand. NDCG@5"),
    ("sampled-20", "mrr", "20 cand. MRR"),
    ("sampled-100", "hr@10", "100 cand. HR@10"),
    ("sampled-100", "ndcg@10", "100 cand. NDCG@10"),
    ("full", "recall@10", "Full Recall@10"),
    ("full", "recall@20", "Full Recall@20"),
    ("full", "ndcg@10", "Full NDCG@10"),
)


def metric_table(report: dict, which: str) -> str:
    """Markdown table of ``which`` split metrics, mean ± std over seeds."""
    header = "| Model | H | " + " | ".join(label for _, _, label in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for model, entry in report["summary"].items():
        cells = []
        for protocol, metric, _ in TABLE_COLUMNS:
            stats = entry[which].get(protocol, {}).get(metric)
            cells.append("n/a" if stats is None else f"{stats['mean']:.4f} ± {stats['std']:.4f}")
        lines.append(f"| {MODEL_LABELS.get(model, model)} | {entry['max_history']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(report: dict) -> str:
    lines = [
        "| Model | train (s) | to best val (s) | eval, all protocols and splits (s) |",
        "|---|---|---|---|",
    ]
    for model, entry in report["summary"].items():
        times = entry["times"]

        def cell(key: str, digits: int = 1) -> str:
            return f"{times[key]['mean']:.{digits}f} ± {times[key]['std']:.{digits}f}" if key in times else "–"

        lines.append(f"| {MODEL_LABELS.get(model, model)} | {cell('train_time_s')} | {cell('time_to_best_s')} | {cell('eval_time_s', 2)} |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    machine = report["machine"]
    seeds = ", ".join(map(str, report["seeds"]))
    stats = report["dataset_stats"]
    return "\n".join(
        [
            f"# Baselines on {report['dataset']}",
            "",
            f"Produced by `{report['command']}` on {report['created']} (git {report['git_revision'] or 'unknown'}).",
            f"Machine: {machine['cpu']} — {machine['torch_threads']} torch threads on {machine['cpu_count']} cores, "
            f"torch {machine['torch']}, {machine.get('gpu') or 'no GPU'}.",
            "",
            f"{stats['users']} users, {stats['items']} items, {stats['interactions']} interactions; leave-one-out by "
            "time. Mean ± std (sample std) over seeds "
            f"{seeds}; a seed fixes the sampled candidate lists and SASRec's initialisation and data order. "
            "H = history items the model reads. Ties count as the expected value over random tie orders.",
            "",
            "## Test",
            "",
            metric_table(report, "test"),
            "",
            "## Validation",
            "",
            metric_table(report, "valid"),
            "",
            "## Wall time per seed",
            "",
            time_table(report),
            "",
            "SASRec's train time includes the patience epochs after its best validation check; MiniLM's is the "
            "one-off encoding of every item text. Eval covers all three protocols on both splits.",
            "",
            f"Whole command: {report['total_time_s']:.0f} s.",
            "",
        ]
    )


def write_report(report: dict, output: Path) -> tuple[Path, Path]:
    """Write the JSON report and its markdown rendering (same stem, ``.md``)."""
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    markdown = atomic_write_text(output.with_suffix(".md"), render_markdown(report))
    log.info("wrote %s and %s", output, markdown)
    return output, markdown

