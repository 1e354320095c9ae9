"""A tiny serving world for the service's tests, built once per session in a temp folder (seconds).

* ``data/``: a synthetic dataset (12 users, 40 items) written as ``interactions.csv`` + ``items.csv``,
  what ``mixllm.data.load_dataset`` reads from a folder;
* ``sasrec/``: a random 16-wide SASRec over those 40 items (the retriever of ``/v1/recommend``);
* ``student/``: a tiny random-Llama student reading ``minilm+sasrec`` features (384 + 16): the text
  columns are :func:`fake_encode` of the item texts, the collaborative columns SASRec's item
  vectors, so ``Catalog.same_space`` holds and a client's ``features`` reach the student too;
* ``teacher/``: a tiny random-Llama teacher (items as text).

:func:`fake_encode` stands in for MiniLM (deterministic unit vectors seeded by a hash of each text),
so in-process tests never load it; the real-process tests (``mixllm serve``) load the packaged one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HISTORY = 4
"""max_history of both tiny rankers."""
SASREC_DIM = 16
TEXT_DIM = 384


def fake_encode(texts: list[str]) -> torch.Tensor:
    """(n, 384) L2-normalised vectors, a deterministic function of each text (not of the batch)."""
    out = torch.empty(len(texts), TEXT_DIM)
    for i, text in enumerate(texts):
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        out[i] = torch.from_numpy(np.random.default_rng(seed).standard_normal(TEXT_DIM)).float()
    return torch.nn.functional.normalize(out, dim=-1)


@dataclass
class World:
    root: Path
    data: Path
    sasrec: Path
    student: Path
    teacher: Path
    item_ids: list[str]
    """Seed item ids, row order."""
    item_texts: list[str]
    user_ids: list[str]
    """Seed users (each has >= 5 events)."""

    def settings(self, store: Path, **changes):
        from serving.settings import Settings

        values = dict(checkpoint=[f"student={self.student}", f"teacher={self.teacher}"], sasrec=str(self.sasrec),
                      dataset=str(self.data), store=str(store), device="cpu", threads=1, warmup=False, qa_model="")
        values.update(changes)
        return Settings(**values)

    def serve_args(self, store: Path, port: int) -> list[str]:
        """``mixllm serve`` flags for a server over this world (student only: faster to start)."""
        return ["--checkpoint", f"student={self.student}", "--sasrec", str(self.sasrec), "--dataset", str(self.data),
                "--store", str(store), "--port", str(port), "--device", "cpu", "--threads", "1", "--qa-model", ""]


def _save_tiny_ranker(path: Path, mode: str, features: torch.Tensor | None, texts: list[str], seed: int,
                      recipe: dict) -> None:
    """Build and save a tiny ranker the way ``training.rankers.save_ranker`` lays it out: the base LLM
    in ``path/base_model`` (referenced by the config), the ranker, and ``training_run.json``."""
    from mixllm.config import ItemConfig, MixLLMConfig
    from mixllm.loading import build, tiny_language_model
    from mixllm.ranking import ItemCatalog, MixLLMRanker

    language_model, tokenizer = tiny_language_model(seed)
    item = None if features is None else ItemConfig(feature_dim=int(features.shape[1]), projector="linear")
    base = path / "base_model"
    language_model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    model, processor = build(MixLLMConfig(language_model=str(base.resolve()), item=item), language_model=language_model,
                             tokenizer=tokenizer)
    torch.manual_seed(seed)
    ranker = MixLLMRanker(model, processor, ItemCatalog(texts=texts, features=features), mode=mode, max_history=HISTORY)
    provenance = {"role": mode, "recipe": recipe}
    ranker.save_pretrained(path, provenance=provenance)
    (path / "training_run.json").write_text(json.dumps(provenance))


def build_tiny_qa(path: Path, seed: int = 2) -> Path:
    """A tiny image QA checkpoint laid out as training writes one: the tiny random Llama over the SmolLM2
    tokenizer (its real chat template) in ``path/base_model``, EfficientNet-Lite0 with its packaged weights
    (49 image tokens), a random projector and random LoRA adapters (rank 2, so merging them matters). The
    language model's weights are drawn wider than usual (std 0.5) so that its greedy answers vary with the
    image and the question, instead of repeating one token."""
    from mixllm.config import ImageConfig, MixLLMConfig
    from mixllm.loading import build, tiny_language_model
    from mixllm.lora import LoRAConfig, LoRALinear

    language_model, tokenizer = tiny_language_model(seed, initializer_range=0.5)
    base = path / "base_model"
    language_model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = MixLLMConfig(language_model=str(base.resolve()), image=ImageConfig(), lora=LoRAConfig(rank=2, alpha=4.0))
    model, _ = build(config, language_model=language_model, tokenizer=tokenizer)
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.05)
    model.save_pretrained(path)
    return path


def build_world(root: Path) -> World:
    from mixllm.baselines.sasrec import SASRec, SASRecConfig
    from mixllm.data import load_dataset, make_synthetic_dataset

    root.mkdir(parents=True, exist_ok=True)
    synthetic = make_synthetic_dataset(num_users=12, num_items=40, min_length=5, max_length=12, seed=0)
    data = root / "data"
    data.mkdir(exist_ok=True)
    synthetic.interactions.assign(user_id=[str(u) for u in synthetic.user_ids[synthetic.interactions["user_idx"]]],
                                  item_id=synthetic.items["item_id"].to_numpy()[synthetic.interactions["item_idx"]])[
        ["user_id", "item_id", "timestamp"]].to_csv(data / "interactions.csv", index=False)
    synthetic.items[["item_id", "text"]].to_csv(data / "items.csv", index=False)
    dataset = load_dataset(data)  # what the service reads: its row order is the one that counts
    texts = list(dataset.item_texts)

    torch.manual_seed(0)
    sasrec = SASRec(SASRecConfig(num_items=dataset.num_items, hidden_size=SASREC_DIM, num_blocks=1, num_heads=1,
                                 max_history=20, ffn_size=32, dropout=0.0)).eval()
    sasrec.save_pretrained(root / "sasrec")
    features = torch.cat([fake_encode(texts), sasrec.item_embeddings().detach().float()], dim=1)  # (N, 400)

    _save_tiny_ranker(root / "student", "student", features, texts, 0, {"item_features": "minilm+sasrec",
                                                                       "history_length": HISTORY})
    _save_tiny_ranker(root / "teacher", "teacher", None, texts, 1, {"history_length": HISTORY})
    return World(root, data, root / "sasrec", root / "student", root / "teacher",
                 [str(i) for i in dataset.items["item_id"]], texts, [str(u) for u in dataset.user_ids])


# --- fixtures ------------------------------------------------------------------------------------
_WORLD: World | None = None


def session_world(tmp_path_factory) -> World:
    """The world, built on first use and shared by every test module of the session."""
    global _WORLD
    if _WORLD is None:
        _WORLD = build_world(tmp_path_factory.getbasetemp() / "serving_world")
    return _WORLD


def wait_ready(client, timeout_s: float = 120.0) -> dict:
    """Poll ``/ready`` until 200 (bounded); fail with the last answer otherwise."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/ready")
        if response.status_code == 200:
            return response.json()
        body = response.json()
        if body.get("error", {}).get("type") == "load_failed" or time.monotonic() > deadline:
            raise AssertionError(f"the service did not get ready: {response.status_code} {body}")
        time.sleep(0.05)


def assert_client_error(response, status: int, field: str | None = None, value=None, limit=None) -> dict:
    """A client mistake: ``status``, a JSON error body naming ``field`` (and the value and limit when
    given), never a stack trace. Returns the error object."""
    assert response.status_code == status, (response.status_code, response.text)
    assert "Traceback" not in response.text and 'File "' not in response.text
    error = response.json()["error"]
    assert error["type"] and error["message"]
    if field is not None:
        assert error.get("field") == field, error
        assert field in error["message"], error
    if value is not None:
        assert error.get("value") == value, error
    if limit is not None:
        assert error.get("limit") == limit, error
    return error
