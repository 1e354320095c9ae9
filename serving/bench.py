"""``python -m serving.bench`` (``make bench-serve``): the service's latency and throughput, and what
the service itself costs next to the bare scorer, measured in one run.

One run:

1. builds the requests: ``--users`` real MovieLens-100K users (seeded), each with the 10 items
   before its test target as the history and its sampled-20 test candidates (the offline
   evaluation's lists, :func:`mixllm.data.get_candidates`): 20 candidates, 10 history items. The
   same list, in the same order, for every model, for the bare scorer and for the service;
2. starts ``mixllm serve`` as a child process on a free 127.0.0.1 port with a fresh store in a
   temporary folder (seeded from MovieLens on start, the item token cache beside it);
3. meanwhile loads the same checkpoints in this process and, once the server is ready and idle,
   times the **bare scorer**: :meth:`MixLLMRanker.score` in-process, no HTTP, one request at a
   time (p50 per request) and in batches of 8 (requests/s); the student reads the item token
   cache (:class:`~mixllm.item_cache.ItemTokenCache`), the path the server takes;
4. drives the server from this process over loopback (httpx, asyncio, ``c`` closed-loop clients =
   concurrency ``c``), a bounded number of requests per level: ``/v1/rank`` with every model,
   ``/v1/recommend`` with the student (FAISS top-100 from SASRec, reranked);
5. when the server serves an image QA model (``GET /v1/models``: kind "image-qa"), sends
   ``--chat-requests`` streamed ``/v1/chat/completions`` requests one at a time (an image and a
   question, ``--chat-max-tokens`` tokens at most) and takes the medians of the time to the first
   text and of the decoding rate: (completion tokens - 1) over the time from the first text to the
   chunk that ends the choice (``finish_reason``; the end-of-turn token, decoded last, has no text, and a
   one-word answer is one text chunk); without one the row is skipped with a note;
6. stops the server (always, in a ``finally``) and writes ``reports/serving.json`` and the serving
   section of ``BENCHMARKS.md`` (between markers, so other sections of that file are kept).

Latency is measured by the client, from sending a request to having read the whole response.
Requests/s is successful requests over the level's wall time. Each (model, endpoint) gets two
untimed requests first.

**Threads.** The server and this process run torch with ``--threads`` threads, by default one
fewer than the cores: the load generator needs a core too, and torch threads that share cores
with another busy process lose their time slices while they spin (on this project's 2-core
machine, 2 threads shared with one other busy process were ten times slower per request than 1).
``--threads 0`` leaves torch's default in both.

**Batching.** One server serves every level, with ``--max-batch-size`` 8 on a CPU (the bare
scorer's batch, and a CPU gains no throughput from bigger batches, only latency) and 64 on a GPU
(the concurrency of the GPU target). The teacher is about 15 times slower than the student, so it
gets fewer requests (``--teacher-requests``) and levels (``--teacher-concurrency``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mixllm.errors import MixLLMError
from serving.process import free_port, running_server, wait_ready
from serving.settings import REPO_ROOT, Settings

log = logging.getLogger(__name__)

RANK, RECOMMEND, CHAT = "/v1/rank", "/v1/recommend", "/v1/chat/completions"
CHAT_QUESTION = "What is in the image?"
HISTORY_LENGTH = 10
CANDIDATE_PROTOCOL = "sampled-20"  # 20 candidates: the target and 19 sampled negatives
BARE_BATCH_SIZE = 8
WARMUP_REQUESTS = 2
MARK_BEGIN = "<!-- bench-serve:begin (written by `make bench-serve`, serving/bench.py; edit outside the markers) -->"
MARK_END = "<!-- bench-serve:end -->"
TARGETS = {
    "student_latency_c1": "student p50 at concurrency 1 / bare student p50 for one request",
    "student_throughput_c8": "student requests/s at concurrency 8 / bare student requests/s in batches of 8",
    "student_vs_teacher": "student requests/s / teacher requests/s (service, /v1/rank, same concurrency)",
    "gpu_p50_c1_ms": "GPU: student p50 at concurrency 1 (ms)",
    "gpu_rps_c64": "GPU: student requests/s at concurrency 64",
}


class BenchError(MixLLMError):
    """The benchmark could not run (the server did not start, answered wrongly, ...)."""


# --- numbers (pure) ------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between the closest ranks
    (numpy's default): rank ``r = q/100 * (n - 1)`` of the sorted values, interpolated."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(latencies_s: Sequence[float], wall_s: float, errors: dict[str, int] | None = None) -> dict[str, Any]:
    """One level's figures: ``n`` successful requests, p50/p99/mean latency (ms), requests/s
    (successes over ``wall_s``) and the failures by status or exception name."""
    n = len(latencies_s)
    ms = [s * 1000 for s in latencies_s]
    return {
        "n": n, "errors": dict(errors or {}), "wall_s": wall_s,
        "p50_ms": percentile(ms, 50) if n else None, "p99_ms": percentile(ms, 99) if n else None,
        "mean_ms": statistics.fmean(ms) if n else None, "requests_per_s": n / wall_s if n and wall_s > 0 else None,
    }  # fmt: skip


def _target(value: float | None, op: str, bound: float, **numbers) -> dict[str, Any]:
    met = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return {"value": value, "target": f"{op} {bound:g}", "met": met, **numbers}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def check_targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets from a report: ``{name: {value, target, met, the numbers compared}}``;
    ``met`` is None where a figure was not measured. GPU targets only on a CUDA device."""
    student, teacher = report["models"].get("student"), report["models"].get("teacher")
    rows = {(r["model"], r["endpoint"], r["concurrency"]): r for r in report["service"]}
    bare = report["bare"]

    def service(model: str | None, concurrency: int, key: str) -> float | None:
        return rows.get((model, RANK, concurrency), {}).get(key)

    out: dict[str, dict[str, Any]] = {}
    if student:
        bare_p50 = bare.get(student, {}).get("single", {}).get("p50_ms")
        p50 = service(student, 1, "p50_ms")
        out["student_latency_c1"] = _target(_ratio(p50, bare_p50), "<=", 1.3, service_p50_ms=p50, bare_p50_ms=bare_p50)
        bare_rps = bare.get(student, {}).get("batched", {}).get("requests_per_s")
        rps = service(student, 8, "requests_per_s")
        out["student_throughput_c8"] = _target(_ratio(rps, bare_rps), ">=", 0.9, service_rps=rps, bare_rps=bare_rps)
    if student and teacher:
        shared = sorted({c for m, e, c in rows if m == student and e == RANK} & {c for m, e, c in rows if m == teacher and e == RANK})
        level = 8 if 8 in shared else (shared[-1] if shared else None)
        s_rps, t_rps = service(student, level, "requests_per_s"), service(teacher, level, "requests_per_s")
        out["student_vs_teacher"] = _target(_ratio(s_rps, t_rps), ">=", 8, concurrency=level, student_rps=s_rps,
                                            teacher_rps=t_rps)
    if student and report["machine"].get("device", "").startswith("cuda"):
        out["gpu_p50_c1_ms"] = _target(service(student, 1, "p50_ms"), "<=", 10)
        out["gpu_rps_c64"] = _target(service(student, 64, "requests_per_s"), ">=", 1000)
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The serving section of BENCHMARKS.md (between :data:`MARK_BEGIN` and :data:`MARK_END`)."""
    machine, setup = report["machine"], report["setup"]
    load = machine.get("load_average_before")
    shared = (f" The machine was shared: the 1-minute load average was {load:.1f} on {machine['cpu_count']} cores "
              "before the run started, so other processes competed for the cores and the figures are noisier "
              "and slower than on an idle machine." if load is not None and load >= 0.5 else "")
    lines = [
        MARK_BEGIN, "## Serving (`make bench-serve`)", "",
        f"Measured {report['date']} on {machine['cpu']}, {machine['cpu_count']} cores, GPU {machine['gpu'] or 'none'}, "
        f"device {machine['device']} ({setup['dtype']}), {setup['threads']} torch thread(s) in the server and in the "
        f"bare scorer; Python {machine['python']}, torch {machine['torch']}; revision {report['git_revision'] or 'unknown'}."
        + shared, "",
        f"Requests: {setup['requests']}. Server: `mixllm serve` on 127.0.0.1, max batch size {setup['max_batch_size']}, "
        f"max wait {setup['max_wait_ms']:g} ms, models {', '.join(f'{n} ({m})' for n, m in report['models_served'].items())}. "
        f"Load: {setup['client']}; latency measured by the client; requests/s = successful requests / wall time.", "",
        "| model | endpoint | concurrency | requests | p50 ms | p99 ms | req/s | mean batch | model ms / batch | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for row in report["service"]:
        errors = ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or "0"
        lines.append(f"| {row['model']} | `{row['endpoint']}` | {row['concurrency']} | {row['n']} | {_fmt(row['p50_ms'])} | "
                     f"{_fmt(row['p99_ms'])} | {_fmt(row['requests_per_s'], 2)} | {_fmt(row.get('mean_batch_size'))} | {_fmt(row.get('mean_batch_ms'))} | {errors} |")
    chat = report.get("chat")
    if chat:
        lines += ["", f"Image question answering: {chat['n']} streamed `{CHAT}` requests one at a time with "
                  f"`{chat['model']}` (a {chat['image']} image, {chat['prompt_tokens']} prompt tokens, at most "
                  f"{chat['max_tokens']} new tokens); medians.", "",
                  "| model | requests | time to first token ms | decode tokens/s | completion tokens (mean) | errors |",
                  "|---|---:|---:|---:|---:|---|",
                  f"| {chat['model']} | {chat['n']} | {_fmt(chat['ttft_p50_ms'])} | {_fmt(chat['decode_tokens_per_s_p50'])} | "
                  f"{_fmt(chat['completion_tokens_mean'])} | {', '.join(f'{k}: {v}' for k, v in chat['errors'].items()) or '0'} |"]  # fmt: skip
    lines += ["", f"Bare scorer: `MixLLMRanker.score` in the benchmark process, no HTTP, on the same requests while the "
              f"server is idle ({setup['bare_item_path']}).", "",
              "| model | requests one at a time | p50 ms | p99 ms | requests in batches of 8 | req/s in batches of 8 | median batch ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, bare in report["bare"].items():
        single, batched = bare["single"], bare["batched"]
        lines.append(f"| {name} | {single['n']} | {_fmt(single['p50_ms'])} | {_fmt(single['p99_ms'])} | {batched['requests']} | "
                     f"{_fmt(batched['requests_per_s'], 2)} | {_fmt(batched['median_batch_ms'])} |")
    lines += ["", "Targets:", ""]
    for name, t in report["targets"].items():
        verdict = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        value = "—" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"- {TARGETS.get(name, name)}: {value} (target {t['target']}) — {verdict}")
    lines += ["", f"Re-run: `make bench-serve` (`{report['command']}`; `python -m serving.bench --help` for the levels "
              "and request counts). Figures: `reports/serving.json`." + "".join(f" {note}" for note in report["notes"]),
              MARK_END]  # fmt: skip
    return "\n".join(lines) + "\n"


def update_section(existing: str | None, section: str) -> str:
    """``existing`` (BENCHMARKS.md, or None) with the text between the markers replaced by ``section``
    (appended when the markers are missing); everything outside the markers is kept."""
    if not existing:
        return "# Benchmarks\n\nEvery figure here comes from a command in this repository; each section says which.\n\n" + section
    begin, end = existing.find(MARK_BEGIN), existing.find(MARK_END)
    if begin < 0 or end < begin:
        return existing.rstrip("\n") + "\n\n" + section
    return existing[:begin] + section.rstrip("\n") + existing[end + len(MARK_END):]


def batch_mean(before: str, after: str, model: str, family: str = "mixllm_batch_size") -> float | None:
    """Mean of a per-batch histogram of ``model`` between two ``/metrics`` scrapes (Prometheus text):
    requests per forward by default, seconds per forward with ``family="mixllm_batch_seconds"``."""
    def totals(text: str) -> tuple[float, float]:
        from prometheus_client.parser import text_string_to_metric_families

        found = {"sum": 0.0, "count": 0.0}
        for metric in text_string_to_metric_families(text):
            if metric.name != family:
                continue
            for sample in metric.samples:
                if sample.labels.get("model") == model and sample.name.endswith(("_sum", "_count")):
                    found[sample.name.rsplit("_", 1)[1]] = sample.value
        return found["sum"], found["count"]

    (s0, c0), (s1, c1) = totals(before), totals(after)
    return (s1 - s0) / (c1 - c0) if c1 > c0 else None


# --- requests ------------------------------------------------------------------------------------
@dataclass
class BenchRequest:
    """One real user's request, as catalog rows (bare scorer) and as item ids (HTTP bodies)."""

    user_id: str
    rows: Any
    """The :class:`~mixllm.ranking.RankingRequest` of catalog rows."""
    history: list[str]
    candidates: list[str]

    def body(self, endpoint: str, model: str) -> dict[str, Any]:
        if endpoint == RANK:
            return {"user": {"history": self.history}, "candidates": self.candidates, "model": model}
        return {"user": {"history": self.history}, "k": 10, "model": model}


def build_requests(users: int, seed: int) -> list[BenchRequest]:
    """``users`` MovieLens-100K users drawn with ``seed``: their test histories (10 items) and
    sampled-20 test candidates."""
    from mixllm.data import PROTOCOLS, get_candidates, leave_one_out, load_movielens_100k
    from mixllm.ranking import RankingRequest

    dataset = load_movielens_100k()
    split = leave_one_out(dataset)
    lists = get_candidates(split, PROTOCOLS[CANDIDATE_PROTOCOL], "test", seed)
    chosen = np.random.default_rng(seed).choice(split.num_users, size=min(users, split.num_users), replace=False)
    ids = [str(i) for i in dataset.items["item_id"]]
    out = []
    for user, history in zip(chosen, split.histories("test", HISTORY_LENGTH, chosen)):
        rows = RankingRequest.from_padded(history, lists.candidates[user], HISTORY_LENGTH)
        out.append(BenchRequest(str(dataset.user_ids[user]), rows, [ids[r] for r in rows.history],
                                [ids[c] for c in rows.candidates]))
    return out


def cycle(items: Sequence, n: int) -> list:
    """The first ``n`` of ``items`` repeated as needed."""
    return [items[i % len(items)] for i in range(n)]


# --- the bare scorer -----------------------------------------------------------------------------
class FusedBare:
    """A fused ranker as the bare scorer: each request first gets SASRec's scores of its candidates
    (over its history, as the service computes them for ``/v1/rank``), then the ranker scores it."""

    def __init__(self, ranker, retriever) -> None:
        self.ranker, self.retriever, self.mode = ranker, retriever, ranker.mode

    def score(self, requests: list) -> list:
        import torch

        from mixllm.retrieval import left_padded

        fused = []
        for request in requests:
            scores = self.retriever.candidate_scores(left_padded(request.history), torch.as_tensor([list(request.candidates)]))[0]
            fused.append(replace(request, retriever_scores=scores.tolist()))
        return self.ranker.score(fused)


def load_bare(name: str, path: Path, device, item_texts: list[str], sasrec: str | None = None):
    """The ranker as the server loads it (dtype and device), the student with its item token cache; a
    fused ranker behind :class:`FusedBare` with the retriever of ``sasrec`` (the service's --sasrec)."""
    from mixllm.item_cache import ItemTokenCache
    from serving.runtime import load_ranker

    ranker = load_ranker(path, item_texts, device)
    if ranker.mode == "student":
        ranker.token_cache = ItemTokenCache.build(ranker.model, features=ranker.catalog.features)
    log.info("bare scorer: loaded %s (%s) from %s", name, ranker.mode, path)
    if ranker.fusion_gate is None:
        return ranker
    if not sasrec:
        raise BenchError(f"--checkpoint {name}={path}: a fused ranker needs SASRec's scores; pass --sasrec")
    from mixllm.baselines.sasrec import SASRec
    from mixllm.retrieval import FaissRetriever

    return FusedBare(ranker, FaissRetriever(SASRec.from_pretrained(sasrec)))


def time_bare(ranker, singles: list, batches: list[list]) -> dict[str, list[float]]:
    """Seconds of ``ranker.score`` plus copying the scores to the CPU (what the server's model call
    does) for each request of ``singles`` alone and for each batch of ``batches``."""
    import torch

    def run(batch) -> float:
        start = time.perf_counter()
        [s.float().cpu() for s in ranker.score(batch)]
        return time.perf_counter() - start

    with torch.inference_mode():
        return {"single_s": [run([r]) for r in singles], "batch_s": [run(b) for b in batches],
                "batch_sizes": [len(b) for b in batches]}


def bare_figures(times: dict[str, list[float]]) -> dict[str, Any]:
    """The bare scorer's figures from :func:`time_bare`'s times: per-request latency one at a time,
    and requests/s in batches (requests over the summed batch times: the service's definition)."""
    single, batch = times["single_s"], times["batch_s"]
    count = sum(times["batch_sizes"])
    return {
        "single": summarize(single, sum(single)),
        "batched": {"batch_size": max(times["batch_sizes"]), "batches": len(batch), "requests": count,
                    "requests_per_s": count / sum(batch), "median_batch_ms": statistics.median(batch) * 1000,
                    "batch_ms": [t * 1000 for t in batch]},
    }  # fmt: skip


def score_parity(ranker, request: BenchRequest, response: dict) -> float:
    """Largest |bare score - service score| over one request's candidates (same work, same numbers?)."""
    import torch

    with torch.inference_mode():
        bare = ranker.score([request.rows])[0].float().cpu()
    by_id = {r["item_id"]: r["score"] for r in response["results"]}
    return max(abs(float(bare[i]) - by_id[c]) for i, c in enumerate(request.candidates))


# --- the server ----------------------------------------------------------------------------------
async def drive(base_url: str, endpoint: str, bodies: list[dict], concurrency: int) -> dict[str, Any]:
    """Send ``bodies`` with ``concurrency`` closed-loop clients (each sends its next request when
    its last is answered); the level's :func:`summarize`."""
    import httpx

    latencies: list[float] = []
    errors: Counter = Counter()
    queue = iter(bodies)  # shared by the clients: each body is sent once

    async def one_client(client: httpx.AsyncClient) -> None:
        for body in queue:
            start = time.perf_counter()
            try:
                response = await client.post(endpoint, json=body)
            except httpx.HTTPError as error:
                errors[type(error).__name__] += 1
                continue
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors[str(response.status_code)] += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600.0, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one_client(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize(latencies, wall, errors)


def check_response(endpoint: str, request: BenchRequest, response) -> dict:
    """The decoded body, or BenchError if the service did not answer what was asked."""
    if response.status_code != 200:
        raise BenchError(f"{endpoint} answered {response.status_code}: {response.text[:500]}")
    body = response.json()
    expected = len(request.candidates) if endpoint == RANK else 10
    if len(body.get("results", [])) != expected:
        raise BenchError(f"{endpoint} returned {len(body.get('results', []))} results, expected {expected}")
    return body


# --- image question answering -------------------------------------------------------------------
def chat_image_url(size: int = 224) -> str:
    """A fixed test picture as a PNG data URL (the speed does not depend on what it shows)."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((size, size)).convert("RGB").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def time_chat(base_url: str, model: str, requests: int, max_tokens: int, transport=None) -> dict[str, Any]:
    """``requests`` streamed chat completions one at a time (after ``WARMUP_REQUESTS`` untimed): the
    medians of the time to the first text and of the decoding rate (module doc, step 5)."""
    import httpx

    body = {"model": model, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": chat_image_url()}},
                                                      {"type": "text", "text": CHAT_QUESTION}]}]}  # fmt: skip
    ttft, rates, tokens, prompt, errors = [], [], [], None, Counter()
    with httpx.Client(base_url=base_url, timeout=600.0, trust_env=False, transport=transport) as client:
        for i in range(WARMUP_REQUESTS + requests):
            start, first, end, usage = time.perf_counter(), None, None, None
            with client.stream("POST", CHAT, json=body) as response:
                if response.status_code != 200:
                    errors[str(response.status_code)] += 1
                    continue
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[len("data: "):])
                    usage = chunk.get("usage") or usage
                    choice = (chunk.get("choices") or [{}])[0]
                    if choice.get("delta", {}).get("content"):
                        first = first or time.perf_counter()
                    if choice.get("finish_reason"):
                        end = time.perf_counter()  # the last token (end of turn or max_tokens) is decoded
            if i < WARMUP_REQUESTS:
                continue
            if first is None or usage is None:
                errors["no text"] += 1
                continue
            ttft.append(first - start)
            tokens.append(usage["completion_tokens"])
            prompt = usage["prompt_tokens"]
            if usage["completion_tokens"] > 1 and end is not None and end > first:
                rates.append((usage["completion_tokens"] - 1) / (end - first))
    return {"model": model, "endpoint": CHAT, "n": len(ttft), "errors": dict(errors), "max_tokens": max_tokens,
            "image": "224x224 PNG", "prompt_tokens": prompt,
            "ttft_p50_ms": percentile(ttft, 50) * 1000 if ttft else None,
            "decode_tokens_per_s_p50": percentile(rates, 50) if rates else None,
            "completion_tokens_mean": statistics.fmean(tokens) if tokens else None}  # fmt: skip


def served_qa_model(base_url: str) -> str | None:
    """The id of the image QA model the server serves, if any."""
    import httpx

    with httpx.Client(base_url=base_url, timeout=30.0, trust_env=False) as client:
        cards = client.get("/v1/models").json()["data"]
    return next((c["id"] for c in cards if c.get("kind") == "image-qa"), None)


# --- the command ---------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", metavar="NAME=DIR",
                   default=[f"student={REPO_ROOT / 'checkpoints/student'}", f"teacher={REPO_ROOT / 'checkpoints/teacher'}"],
                   help="the models served and timed bare; 'student' and 'teacher' name the targets' models")
    p.add_argument("--sasrec", default=str(REPO_ROOT / "checkpoints/sasrec"),
                   help="SASRec checkpoint for /v1/recommend ('' serves no /v1/recommend and skips it)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto, for the server and the bare scorer")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="torch threads in the server and the bare scorer (default: cores - 1; 0: torch's default)")
    p.add_argument("--max-batch-size", type=int, default=None, help="the server's (default: 8 on a CPU, 64 on a GPU)")
    p.add_argument("--max-wait-ms", type=float, default=Settings.max_wait_ms, help="the server's batching wait (default: its own)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="levels for the student (default: 1 8 32, and 64 on a GPU)")
    p.add_argument("--teacher-concurrency", type=int, nargs="+", default=[1, 8], help="levels for teacher models")
    p.add_argument("--requests", type=int, default=128,
                   help="student /v1/rank requests per level (at least 2 per client: max(this, 2 x concurrency))")
    p.add_argument("--teacher-requests", type=int, default=8, help="teacher requests per level (same rule)")
    p.add_argument("--recommend-requests", type=int, default=16, help="student /v1/recommend requests per level (same rule)")
    p.add_argument("--users", type=int, default=256, help="distinct MovieLens users (requests cycle through them)")
    p.add_argument("--seed", type=int, default=0, help="which users, and the candidate lists' seed")
    p.add_argument("--qa-model", default=None, help="the server's image QA model ([NAME=]DIR; default: the server's "
                   "own default, checkpoints/scenes_qa when it exists; '' for none)")
    p.add_argument("--chat-requests", type=int, default=8, help="streamed /v1/chat/completions requests, one at a time")
    p.add_argument("--chat-max-tokens", type=int, default=32, help="max_tokens of each chat request")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the server's /ready")
    p.add_argument("--output", default=str(REPO_ROOT / "reports/serving.json"), help="the JSON report")
    p.add_argument("--markdown", default=str(REPO_ROOT / "BENCHMARKS.md"), help="where the table goes (its serving section)")
    args = p.parse_args(argv)
    for name in ("requests", "teacher_requests", "recommend_requests", "users", "chat_requests", "chat_max_tokens"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("concurrency", "teacher_concurrency"):
        if any(c < 1 for c in getattr(args, name) or []):
            raise BenchError(f"--{name.replace('_', '-')}: every level must be >= 1, got {getattr(args, name)}")
    return args


@dataclass(frozen=True)
class Level:
    """One measured level: ``n`` requests to ``endpoint`` with ``model`` at ``concurrency``."""

    model: str
    endpoint: str
    concurrency: int
    n: int


def plan_levels(kinds: dict[str, str], levels: Sequence[int], teacher_levels: Sequence[int], recommend: bool,
                requests: int, teacher_requests: int, recommend_requests: int) -> list[Level]:
    """Every model on ``/v1/rank`` (students at ``levels``, teachers at ``teacher_levels``), then the
    first student on ``/v1/recommend`` at ``levels``; each level sends ``max(its count, 2 x concurrency)``
    requests, so every client sends at least two."""
    out = []
    for model, kind in kinds.items():
        base = teacher_requests if kind == "teacher" else requests
        out += [Level(model, RANK, c, max(base, 2 * c)) for c in (teacher_levels if kind == "teacher" else levels)]
    student = next((m for m, k in kinds.items() if k == "student"), None)
    if recommend and student:
        out += [Level(student, RECOMMEND, c, max(recommend_requests, 2 * c)) for c in levels]
    return out


def bare_workload(model: str, plan: list[Level], requests: list) -> tuple[list, list[list]]:
    """What the bare scorer times for ``model``: its concurrency-1 level's count one at a time, and
    its concurrency-8 level's count (else its largest) in batches of 8, on the same requests."""
    rank = {lv.concurrency: lv.n for lv in plan if lv.model == model and lv.endpoint == RANK}
    single = rank.get(1, min(rank.values()))
    batched = math.ceil(rank.get(8, max(rank.values())) / BARE_BATCH_SIZE) * BARE_BATCH_SIZE
    rows = cycle(requests, batched)
    return cycle(requests, single), [rows[i : i + BARE_BATCH_SIZE] for i in range(0, batched, BARE_BATCH_SIZE)]


def halves(items: list) -> tuple[list, list]:
    middle = (len(items) + 1) // 2
    return items[:middle], items[middle:]


def run_service(base_url: str, plan: list[Level], requests: list[BenchRequest], bare_rankers: dict) -> tuple[list, dict]:
    """Every level of ``plan`` against the server (rows of figures), and per model the largest score
    difference between the service and the bare scorer on one request."""
    import httpx

    rows, parity, warmed = [], {}, set()
    with httpx.Client(base_url=base_url, timeout=600.0, trust_env=False) as client:
        for level in plan:
            model, endpoint = level.model, level.endpoint
            if (model, endpoint) not in warmed:  # untimed: checks the answers, and the scores against the bare scorer
                for request in requests[:WARMUP_REQUESTS]:
                    body = check_response(endpoint, request, client.post(endpoint, json=request.body(endpoint, model)))
                if endpoint == RANK:
                    parity[model] = score_parity(bare_rankers[model], requests[WARMUP_REQUESTS - 1], body)
                warmed.add((model, endpoint))
            log.info("%s %s, concurrency %d: %d requests ...", model, endpoint, level.concurrency, level.n)
            before = client.get("/metrics").text
            bodies = [r.body(endpoint, model) for r in cycle(requests, level.n)]
            row = asyncio.run(drive(base_url, endpoint, bodies, level.concurrency))
            row = {"model": model, "endpoint": endpoint, "concurrency": level.concurrency, **row,
                   "mean_batch_size": batch_mean(before, after := client.get("/metrics").text, model),
                   "mean_batch_ms": _ms(batch_mean(before, after, model, "mixllm_batch_seconds")),
                   "load_average": os.getloadavg()[0]}  # fmt: skip
            rows.append(row)
            log.info("%s %s, concurrency %d: p50 %s ms, p99 %s ms, %s requests/s, mean batch %s, errors %s", model,
                     endpoint, level.concurrency, _fmt(row["p50_ms"]), _fmt(row["p99_ms"]), _fmt(row["requests_per_s"], 2),
                     _fmt(row["mean_batch_size"]), row["errors"] or 0)
    return rows, parity


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    import torch

    from mixllm.data import load_movielens_100k
    from mixllm.provenance import git_revision, machine_info
    from mixllm.loading import resolve_device

    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    max_batch = args.max_batch_size or (64 if cuda else 8)
    levels = args.concurrency or ([1, 8, 32, 64] if cuda else [1, 8, 32])
    settings = Settings(checkpoint=list(args.checkpoint), sasrec=args.sasrec, max_batch_size=max_batch,
                        max_queue=max(64, 2 * max(levels + args.teacher_concurrency)), device=args.device,
                        threads=args.threads or None, max_wait_ms=args.max_wait_ms)
    models, recommend = settings.models, bool(args.sasrec)
    if recommend and not (Path(args.sasrec) / "config.json").is_file():
        raise BenchError(f"--sasrec {args.sasrec}: not a SASRec checkpoint (config.json is missing); pass --sasrec '' "
                         "to benchmark without /v1/recommend")
    requests = build_requests(args.users, args.seed)
    log.info("%d requests from MovieLens-100K users (%d history items, %d candidates each)", len(requests),
             HISTORY_LENGTH, len(requests[0].candidates))

    with tempfile.TemporaryDirectory(prefix="mixllm-bench-") as workdir:
        port, log_path = free_port(), Path(workdir) / "server.log"
        base_url = f"http://127.0.0.1:{port}"
        command = ["--host", "127.0.0.1", "--port", str(port),
                   "--checkpoint", *settings.checkpoint, "--sasrec", settings.sasrec,
                   "--store", str(Path(workdir) / "store.sqlite"), "--max-batch-size", str(max_batch),
                   "--max-wait-ms", f"{settings.max_wait_ms:g}", "--max-queue", str(settings.max_queue),
                   "--device", args.device]  # fmt: skip
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.qa_model is not None:
            command += ["--qa-model", args.qa_model]
        start = time.perf_counter()
        with running_server(command, log_path) as process:
            item_texts = list(load_movielens_100k().item_texts)  # loads beside the server's start-up
            bare_rankers = {name: load_bare(name, path, device, item_texts, args.sasrec) for name, path in models.items()}
            ready = wait_ready(base_url, process, args.ready_timeout, log_path)
            startup_s = time.perf_counter() - start
            log.info("server: ready in %.0f s, models %s", startup_s, ", ".join(ready["models"]))
            kinds = {name: r.mode for name, r in bare_rankers.items()}
            plan = plan_levels(kinds, levels, args.teacher_concurrency, recommend, args.requests, args.teacher_requests,
                               args.recommend_requests)
            # The bare scorer runs while the server is idle, half before the HTTP load and half after, pooled:
            # a change in the machine's background load during the run then weighs on both sides alike.
            work = {m: bare_workload(m, plan, [r.rows for r in requests]) for m in models}
            times = {m: {"single_s": [], "batch_s": [], "batch_sizes": []} for m in models}

            def time_bare_half(half: int) -> None:
                for name, ranker in bare_rankers.items():
                    singles, batches = halves(work[name][0])[half], halves(work[name][1])[half]
                    log.info("bare %s (%s half): %d requests one at a time, %d in batches of 8 ...", name,
                             ("first", "second")[half], len(singles), sum(map(len, batches)))
                    for key, values in time_bare(ranker, singles, batches).items():
                        times[name][key] += values

            for ranker in bare_rankers.values():
                time_bare(ranker, [requests[0].rows], [])  # warm-up, untimed
            time_bare_half(0)
            service, parity = run_service(base_url, plan, requests, bare_rankers)
            qa_model = served_qa_model(base_url)
            chat = None
            if qa_model is not None:
                log.info("%s %s: %d streamed requests ...", qa_model, CHAT, args.chat_requests)
                chat = time_chat(base_url, qa_model, args.chat_requests, args.chat_max_tokens)
                log.info("%s %s: time to first token %s ms, %s tokens/s (medians)", qa_model, CHAT,
                         _fmt(chat["ttft_p50_ms"]), _fmt(chat["decode_tokens_per_s_p50"]))
            time_bare_half(1)
            bare = {m: bare_figures(t) for m, t in times.items()}
            for name, b in bare.items():
                log.info("bare %s: p50 %.1f ms per request, %.2f requests/s in batches of 8", name, b["single"]["p50_ms"],
                         b["batched"]["requests_per_s"])

    student = next((n for n, k in kinds.items() if k == "student"), None)
    teacher = next((n for n, k in kinds.items() if k == "teacher"), None)
    notes = []
    if chat is None:
        notes.append(f"{CHAT} was not measured: the server had no image QA model (train checkpoints/scenes_qa with "
                     "`make caption`, or pass --qa-model DIR).")
    if not recommend:
        notes.append("/v1/recommend was not measured (run without a SASRec checkpoint).")
    elif student:
        notes.append("/v1/recommend was run with the student only.")
    if teacher:
        notes.append(f"The teacher ran fewer requests ({args.teacher_requests} per level, at least 2 per client) and only "
                     f"concurrency {', '.join(map(str, args.teacher_concurrency))}: it is about 15 times slower than the "
                     "student.")
    report: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "serving.bench", *argv]), "date": time.strftime("%Y-%m-%d"),
        "git_revision": git_revision(), "machine": {**machine_info(), "device": str(device), "load_average_before": load_before},
        "models": {"student": student, "teacher": teacher}, "models_served": kinds,
        "checkpoints": {n: str(p) for n, p in models.items()},
        "setup": {
            "requests": f"{len(requests)} MovieLens-100K users (seed {args.seed}), each its {HISTORY_LENGTH} most recent "
                        f"items before the test target and its {CANDIDATE_PROTOCOL} test candidates (20 items); "
                        "/v1/recommend: the same histories, k=10, FAISS top-100 then the student",
            "client": f"httpx (asyncio) in a separate process over loopback, closed-loop clients = concurrency; "
                      f"{WARMUP_REQUESTS} untimed requests per model and endpoint first",
            "threads": args.threads or torch.get_num_threads(), "dtype": "bf16" if cuda else "fp32",
            "max_batch_size": max_batch, "max_wait_ms": settings.max_wait_ms, "max_queue": settings.max_queue,
            "server_command": shlex.join(command), "server_startup_s": startup_s,
            "bare_item_path": "the student reads the item token cache, ItemTokenCache.build + ranker.token_cache, as the "
                              "server does; the teacher reads item texts; half the bare timings before the HTTP load, "
                              "half after, pooled",
            "levels": [vars(level) for level in plan],
        },
        "service": service, "bare": bare, "chat": chat, "score_parity_max_abs": parity, "notes": notes,
    }  # fmt: skip
    report["targets"] = check_targets(report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        report = run(args, argv)
    except MixLLMError as error:
        print(f"bench-serve: error: {error}", file=sys.stderr)
        return 2
    from mixllm.provenance import atomic_write_text

    output, markdown = Path(args.output), Path(args.markdown)
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    section = render_markdown(report)
    atomic_write_text(markdown, update_section(markdown.read_text() if markdown.is_file() else None, section))
    print(section)
    print(f"wrote {output} and {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
