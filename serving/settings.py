"""Service settings: one dataclass, every field a ``mixllm serve`` flag and a ``MIXLLM_*`` variable.

Precedence: command-line flag > environment variable (``MIXLLM_`` + the field name in upper case,
e.g. ``MIXLLM_MAX_BATCH_SIZE=16``) > the default below. ``mixllm serve --help`` lists them all.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from mixllm.errors import MixLLMError
from mixllm.image_input import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

REPO_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(MixLLMError, ValueError):
    """A setting is invalid; the message names the flag/variable and the value."""


def _default_store() -> str:
    from mixllm.assets import mixllm_home

    return str(mixllm_home() / "serving" / "store.sqlite")


@dataclass
class Settings:
    """How the service runs."""

    checkpoint: list[str] = field(default_factory=lambda: [f"student={REPO_ROOT / 'checkpoints' / 'student'}"])
    """Ranker checkpoints to serve, ``[NAME=]DIR`` each; the first is the default model (a request's
    ``model`` picks another). Teachers read item texts, students the cached item tokens."""
    sasrec: str = str(REPO_ROOT / "checkpoints" / "sasrec")
    """SASRec checkpoint folder: the retriever of ``/v1/recommend`` (FAISS over its item vectors)."""
    dataset: str = "ml-100k"
    """What seeds an empty store: "ml-100k" or a dataset folder (``mixllm.data.load_dataset``)."""
    store: str = field(default_factory=_default_store)
    """The SQLite file holding the catalog and the events (created and seeded on first start)."""
    cache_dir: str | None = None
    """Where item token caches are kept (default: beside the store)."""
    host: str = "127.0.0.1"
    """Address uvicorn binds."""
    port: int = 8000
    """Port uvicorn binds."""
    device: str = "auto"
    """"cpu", "cuda" or "auto" (cuda when available; models and the item cache in bf16 there)."""
    threads: int | None = None
    """torch CPU threads (default: torch's)."""
    max_batch_size: int = 8
    """Most rank requests gathered into one model forward."""
    max_wait_ms: float = 50.0
    """The longest a batch waits for more requests (the wait itself adapts: see batch_wait_fraction)."""
    batch_wait_fraction: float = 0.2
    """A batch waits for as many requests as the last one held, at most this fraction of the last
    forward's time (and max_wait_ms); one request at a time never waits (serving.batching)."""
    max_queue: int = 64
    """Requests waiting per model; beyond it the service answers 503 with Retry-After."""
    max_candidates: int = 1000
    """Most candidates (or documents) one request may carry."""
    max_recommend: int = 100
    """Most items ``/v1/recommend`` returns (``k``)."""
    retrieve: int = 100
    """``/v1/recommend``: FAISS top-k that the ranker reranks."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted (413 beyond)."""
    max_events: int = 1000
    """Most events one ``/v1/events`` call may carry."""
    api_key: str | None = None
    """When set, every route but /health and /ready needs ``Authorization: Bearer <key>``."""
    warmup: bool = True
    """Run one request per model before /ready says ready."""
    qa_model: str | None = None
    """The image QA model of /v1/chat/completions, ``[NAME=]DIR`` (a mixllm or llava-hf checkpoint; a missing
    DIR fails start-up). Unset: checkpoints/scenes_qa as "scenes-qa" if it exists (else a warning, and the
    route answers 503); "" serves none."""
    max_image_bytes: int = MAX_IMAGE_BYTES
    """Largest image a chat request may carry, in bytes (413 beyond); the chat route accepts bodies of
    max_body_bytes plus max_images base64 images of this size."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Largest image, in pixels (width x height, read before decoding; 413 beyond)."""
    max_images: int = 1
    """Most images per chat request (each becomes the model's image tokens in the prompt)."""
    allow_remote_images: bool = False
    """Fetch http(s) image URLs (with the same limits); off: only data URLs (a remote URL is refused, 400),
    so the service never makes requests a client chose."""
    remote_image_timeout_s: float = 10.0
    """Timeout of fetching one remote image (allow_remote_images)."""
    max_tokens_limit: int = 512
    """Most tokens a chat request may ask for (max_tokens; 422 beyond); without max_tokens, 256 or this if less."""

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint, str):
            self.checkpoint = self.checkpoint.split(",")
        for name in ("port", "max_batch_size", "max_queue", "max_candidates", "max_recommend", "retrieve",
                     "max_body_bytes", "max_events", "max_image_bytes", "max_image_pixels", "max_images",
                     "max_tokens_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SettingsError(f"{_flag(name)}: must be an integer >= 1, got {value!r}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise SettingsError(f"{_flag(name='max_wait_ms')}: must be between 0 and 1000 ms, got {self.max_wait_ms!r}")
        if not 0 <= self.batch_wait_fraction <= 1:
            raise SettingsError(f"{_flag('batch_wait_fraction')}: must be between 0 and 1, got {self.batch_wait_fraction!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SettingsError(f"--device: must be auto, cpu or cuda, got {self.device!r}")
        if not self.checkpoint:
            raise SettingsError("--checkpoint: give at least one ranker checkpoint")
        if self.max_tokens_limit > 4096:
            raise SettingsError(f"{_flag('max_tokens_limit')}: must be at most 4096, got {self.max_tokens_limit!r}")
        if not self.remote_image_timeout_s > 0:
            raise SettingsError(f"{_flag('remote_image_timeout_s')}: must be > 0, got {self.remote_image_timeout_s!r}")

    @property
    def models(self) -> dict[str, Path]:
        """``{name: checkpoint dir}`` in the order given (the first is the default)."""
        out: dict[str, Path] = {}
        for spec in self.checkpoint:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).name, spec
            if not name or name in out:
                raise SettingsError(f"--checkpoint: model names must be unique and non-empty, got {spec!r}")
            out[name] = Path(path)
        return out

    @property
    def max_chat_body_bytes(self) -> int:
        """The chat route's body limit: max_body_bytes plus max_images base64-encoded images of max_image_bytes."""
        return self.max_body_bytes + self.max_images * 4 * math.ceil(self.max_image_bytes / 3)

    @property
    def token_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.store).parent / "item_tokens"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Defaults, then ``MIXLLM_*`` variables, then ``overrides`` (None values are ignored)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(f"MIXLLM_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')} / MIXLLM_{name.upper()}"


def _parse(f: dataclasses.Field, raw: str):
    kind = str(f.type)
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind.startswith("list"):
            return [part for part in raw.split(",") if part]
        return raw
    except ValueError:
        raise SettingsError(f"MIXLLM_{f.name.upper()}: cannot read {raw!r} as {kind}") from None


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string under it in :class:`Settings`), for ``--help`` and the README."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(Settings)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def add_arguments(parser) -> None:
    """One flag per field of :class:`Settings` (defaults None, so the environment can fill in)."""
    docs = field_docs()
    for f in fields(Settings):
        flag, kind = f"--{f.name.replace('_', '-')}", str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = f"{docs.get(f.name, '')} [env MIXLLM_{f.name.upper()}; default {default!r}]".replace("%", "%%")
        if kind.startswith("list"):
            parser.add_argument(flag, dest=f.name, default=None, nargs="+", metavar="[NAME=]DIR", help=doc)
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=lambda raw, f=f: _parse(f, raw),
                                metavar="true|false" if kind.startswith("bool") else None, help=doc)
