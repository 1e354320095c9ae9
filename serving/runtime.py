"""Start-up: open the store (seeding it on first start), load the models, build the caches, warm up.

:func:`load_runtime` is what the app's lifespan runs (in a thread, so ``/health`` answers while it
works). Everything heavy happens here, nothing at import time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mixllm.data import load_dataset
from mixllm.errors import DataError
from mixllm.features import FeatureLayout
from mixllm.loading import resolve_device
from mixllm.ranking import ItemCatalog, MixLLMRanker
from serving.catalog import Catalog, StudentItems
from serving.chat import ChatService
from serving.services import EventService, RankingService, ServedModel, UserContext
from serving.settings import Settings
from serving.store import Store, seed_from_dataset

log = logging.getLogger(__name__)

DEFAULT_QA_NAME = "scenes-qa"
"""The id of the repository's image QA model (checkpoints/scenes_qa) when it is served by default."""


@dataclass
class Runtime:
    """What the routes call: the services and what they stand on."""

    settings: Settings
    store: Store
    catalog: Catalog
    models: dict[str, ServedModel]
    ranking: RankingService
    events: EventService
    device: torch.device
    chat: ChatService | None = None
    """/v1/chat/completions over the image QA model; None when none is served (``chat_unavailable`` says why)."""
    chat_unavailable: str = ""

    @property
    def model_names(self) -> list[str]:
        """Every served model: the rankers, then the image QA model."""
        return list(self.models) + ([self.chat.name] if self.chat is not None else [])


def load_ranker(path: Path, item_texts: list[str], device: torch.device) -> MixLLMRanker:
    """A ranker as the service runs it: bf16 on a GPU (fp32 on a CPU), on ``device``, eval mode, and
    its LoRA adapters merged into the base weights (:func:`mixllm.lora.merge_lora`: the same
    function without the adapters' 120 extra low-rank matmuls per forward). Serving never trains or
    saves, so merging is safe."""
    from mixllm.lora import merge_lora

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ranker = MixLLMRanker.from_pretrained(path, ItemCatalog(texts=list(item_texts)), dtype=dtype)
    merge_lora(ranker.model.language_model)
    return ranker.to(device).eval()


def qa_checkpoint(settings: Settings) -> tuple[str, Path] | None:
    """(name, directory) of the image QA model to serve (:attr:`Settings.qa_model`), None for none; a
    directory that was asked for and does not exist is a DataError."""
    from mixllm.qa import DEFAULT_QA_CHECKPOINT

    if settings.qa_model is None:
        return (DEFAULT_QA_NAME, DEFAULT_QA_CHECKPOINT) if DEFAULT_QA_CHECKPOINT.is_dir() else None
    if settings.qa_model == "":
        return None
    name, sep, path = settings.qa_model.partition("=")
    if not sep:
        name, path = Path(settings.qa_model).name, settings.qa_model
    if not name or name in settings.models:
        raise DataError(f"--qa-model {settings.qa_model}: the model needs a name of its own (NAME=DIR), not a ranker's")
    if not Path(path).is_dir():
        raise DataError(f"--qa-model {settings.qa_model}: no such checkpoint directory")
    return name, Path(path)


def load_chat(settings: Settings, device: torch.device) -> tuple[ChatService | None, str]:
    """The chat service over the image QA model, or None and the reason (a 503's message)."""
    from mixllm.qa import DEFAULT_QA_CHECKPOINT, QAModel

    spec = qa_checkpoint(settings)
    if spec is None:
        if settings.qa_model == "":
            return None, "this service runs without an image QA model (--qa-model '')"
        reason = (f"no image QA model is loaded: {DEFAULT_QA_CHECKPOINT} does not exist (train it with `make caption`) "
                  "and no --qa-model / MIXLLM_QA_MODEL was given")
        log.warning("%s; /v1/chat/completions answers 503", reason)
        return None, reason
    name, path = spec
    start = time.perf_counter()
    chat = ChatService(settings, QAModel.load(path, device, max_images=settings.max_images), name)
    chat.load_seconds = time.perf_counter() - start
    log.info("loaded %s (image QA) from %s in %.1f s", name, path, chat.load_seconds)
    return chat, ""


def load_runtime(settings: Settings, encode_texts=None) -> Runtime:
    """Open, seed, load and warm up (see module doc). ``encode_texts`` (texts -> (n, 384)) defaults to
    the packaged MiniLM."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    Path(settings.store).parent.mkdir(parents=True, exist_ok=True)
    store = Store(settings.store)
    dataset = load_dataset(settings.dataset)
    if seed_from_dataset(store, dataset):
        log.info("seeded %s with %s: %d items, %d events", settings.store, dataset.name, store.num_items(), store.num_events())
    if encode_texts is None:
        from mixllm.encoders.text import SentenceEncoder

        encoder = SentenceEncoder.from_pretrained()

        def encode_texts(texts: list[str]) -> torch.Tensor:
            return encoder.encode(list(texts))

    models: dict[str, ServedModel] = {}
    students: dict[str, StudentItems] = {}
    teachers: dict[str, MixLLMRanker] = {}
    for name, path in settings.models.items():
        if not path.is_dir():
            raise DataError(f"--checkpoint {name}={path}: no such checkpoint directory")
        start = time.perf_counter()
        ranker = load_ranker(path, dataset.item_texts, device)
        models[name] = ServedModel(name, ranker, time.perf_counter() - start)
        if ranker.mode == "student":
            if ranker.catalog.features is None or ranker.catalog.features.shape[0] != dataset.num_items:
                raise DataError(f"--checkpoint {name}={path}: the student must store features of the "
                                f"{dataset.num_items} {dataset.name} items (catalog_features.safetensors)")
            students[name] = StudentItems(ranker, FeatureLayout.from_checkpoint(path), ranker.catalog.features.float())
        else:
            teachers[name] = ranker
        log.info("loaded %s (%s) from %s in %.1f s", name, ranker.mode, path, models[name].load_seconds)
    retriever = None
    if settings.sasrec:
        from mixllm.baselines.sasrec import SASRec
        from mixllm.retrieval import FaissRetriever

        if not (Path(settings.sasrec) / "config.json").is_file():
            raise DataError(f"--sasrec {settings.sasrec}: not a SASRec checkpoint (config.json is missing)")
        sasrec = SASRec.from_pretrained(settings.sasrec)
        if sasrec.config.num_items != dataset.num_items:
            raise DataError(f"--sasrec {settings.sasrec}: trained on {sasrec.config.num_items} items, the catalog "
                            f"seed has {dataset.num_items}")
        retriever = FaissRetriever(sasrec)
    fused = [name for name, model in models.items() if model.fused]
    if fused and retriever is None:
        raise DataError(f"--checkpoint {fused[0]}: this ranker adds SASRec's scores to its own (score fusion); "
                        "start the service with --sasrec")  # fmt: skip
    catalog = Catalog(store, dataset.item_texts, encode_texts, students, teachers, retriever,
                      cache_dir=settings.token_cache_dir, checkpoints=settings.models)
    start = time.perf_counter()
    catalog.load()
    log.info("catalog: %d items (%d live), caches ready in %.1f s", len(catalog.item_ids), int(catalog.live.sum()),
             time.perf_counter() - start)
    ranking = RankingService(settings, catalog, models)
    chat, chat_unavailable = load_chat(settings, device)
    runtime = Runtime(settings, store, catalog, models, ranking, EventService(settings, catalog), device, chat,
                      chat_unavailable)
    if settings.warmup:
        warm_up(runtime)
    return runtime


def warm_up(runtime: Runtime) -> None:
    """One small request per model, so the first client does not pay for lazy initialisation."""
    if runtime.chat is not None:
        from PIL import Image

        from mixllm.generation import GenerationSettings
        from mixllm.qa import user_message

        qa = runtime.chat.qa
        list(qa.complete([user_message("What is in the image?")], [Image.new("RGB", (224, 224), (127, 127, 127))],
                         GenerationSettings(max_new_tokens=1)))
    live = [row for row in range(len(runtime.catalog.item_ids)) if runtime.catalog.live[row]][:12]
    if len(live) < 3:
        return
    for model in runtime.models.values():
        context = UserContext(live[:2], 2, set(), live[:2])
        runtime.ranking.run_batch(model, [runtime.ranking.request_for(model, context, live[2:])])
