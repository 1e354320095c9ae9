"""Image question answering: a QA model (a mixllm or a llava-hf checkpoint) answers chat messages about
images, streaming; and the ``mixllm ask`` command. ``/v1/chat/completions`` serves the same calls.

    qa = QAModel.load("checkpoints/scenes_qa")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is red?"}]}]
    completion = qa.complete(messages, [pil_image], GenerationSettings(max_new_tokens=16))
    for delta in completion:                     # text as it is generated
        print(delta, end="")
    completion.prompt_tokens, completion.completion_tokens, completion.finish_reason   # usage, "stop" | "length"

**Messages** are chat messages: ``role`` system, user or assistant, ``content`` a string or a list of
parts ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` (the next of ``images``). Only user
messages carry images; each image's placeholder goes before the text of its message, one per line
(``"<image>\\nWhat is red?"``, as in training: :mod:`mixllm.conversation`). Each image becomes the
model's N image tokens in the prompt, so a request carries at most ``max_images`` images.

**Prompts.** A mixllm checkpoint is prompted as it was trained: the tokenizer's chat template, with
:data:`~mixllm.conversation.SYSTEM_PROMPT` when the messages hold no system message. A llava-hf
checkpoint gets its tokenizer's chat template when it has one, else LLaVA-1.5's format as llava-hf's
processor template renders it: ``"USER: <image>\\nWhat is red? ASSISTANT:"`` (no default system prompt).

**Decoding** is transformers' ``generate`` (greedy, or sampling with temperature and top-p;
:class:`~mixllm.generation.GenerationSettings`) on a worker thread, its tokens handed over one by one,
stopping at the end-of-turn token or after ``max_new_tokens``. ``finish_reason`` is "stop" when the
model ended its turn and "length" when it ran out of tokens; ``completion_tokens`` counts every
generated token, the end-of-turn token included; ``prompt_tokens`` counts the prompt with its image
tokens. LoRA adapters are merged into the weights at load time (:func:`mixllm.lora.merge_lora`).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.generation import BaseStreamer, StoppingCriteria, StoppingCriteriaList

from mixllm.conversation import SYSTEM_PROMPT, end_of_turn_id, render_messages
from mixllm.errors import InputError, MixLLMError
from mixllm.generation import GenerationSettings

logger = logging.getLogger(__name__)

DEFAULT_QA_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "scenes_qa"
"""The repository's trained image QA checkpoint (``make caption`` writes it)."""
MAX_IMAGES = 1
"""Default most images per request."""
ROLES = ("system", "user", "assistant")


class Completion:
    """One answer: iterate it (once) for the text deltas as they are generated. Afterwards ``text``,
    ``completion_tokens`` and ``finish_reason`` hold the result; ``prompt_tokens`` is known at once.
    Stopping the iteration early (or :meth:`cancel` from another thread) stops the generation at its
    next token."""

    def __init__(self, qa: QAModel, batch: dict[str, torch.Tensor], settings: GenerationSettings) -> None:
        self.qa, self.batch, self.settings = qa, batch, settings
        self.prompt_tokens = int(batch["input_ids"].shape[1])
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._cancelled = threading.Event()
        self._started = False

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Completion can be iterated once")
        self._started = True
        tokens = _TokenQueue()
        worker = threading.Thread(target=self._generate, args=(tokens,), name="mixllm-qa-generate", daemon=True)
        worker.start()
        decode = self.qa.decode
        text_ids: list[int] = []
        try:
            for token in tokens:
                self.token_ids.append(token)
                if token in self.qa.stop_ids:
                    continue
                text_ids.append(token)
                text = decode(text_ids)
                # Hold back a partial character (a multi-byte character split over tokens decodes to U+FFFD).
                if text.startswith(self.text) and not text.endswith("\ufffd") and len(text) > len(self.text):
                    delta, self.text = text[len(self.text):], text
                    yield delta
            text = decode(text_ids)
            if text.startswith(self.text) and len(text) > len(self.text):
                delta, self.text = text[len(self.text):], text
                yield delta
        finally:
            self._cancelled.set()  # a consumer that stopped early stops the generation
            worker.join()
        if tokens.error is not None:
            raise tokens.error
        if self.token_ids and self.token_ids[-1] in self.qa.stop_ids:
            self.finish_reason = "stop"
        elif self.completion_tokens >= self.settings.max_new_tokens:
            self.finish_reason = "length"
        else:
            self.finish_reason = "cancelled"

    def _generate(self, tokens: _TokenQueue) -> None:
        """(worker thread) ``generate``, its tokens into ``tokens``."""
        try:
            if self._cancelled.is_set():  # cancelled while it waited for its turn
                tokens.end()
                return
            if self.settings.seed is not None:
                torch.manual_seed(self.settings.seed)
            self.qa.model.generate(
                **self.batch, streamer=tokens, stopping_criteria=StoppingCriteriaList([_Cancelled(self._cancelled)]),
                eos_token_id=sorted(self.qa.stop_ids), pad_token_id=self.qa.processor.pad_token_id,
                **self.settings.generate_kwargs(),
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - re-raised in the consuming thread, which reports it
            tokens.fail(error)


class _TokenQueue(BaseStreamer):
    """transformers' streamer interface (``put``/``end``) feeding a queue that the consumer iterates."""

    def __init__(self) -> None:
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False
        self.error: Exception | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first puts the prompt (empty here: it was given as embeddings)
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():  # (1,) per step: one sequence
            self._queue.put(int(token))

    def end(self) -> None:
        self._queue.put(None)

    def fail(self, error: Exception) -> None:
        self.error = error
        self._queue.put(None)

    def __iter__(self) -> Iterator[int]:
        while (token := self._queue.get()) is not None:
            yield token


class _Cancelled(StoppingCriteria):
    """Stops generation once ``event`` is set (the client went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class QAModel:
    """A model with an image modality and its processor, ready to answer (see the module doc)."""

    model: torch.nn.Module
    processor: object
    kind: str
    """"mixllm" (a mixllm checkpoint) or "llava" (a llava-hf checkpoint): how prompts are rendered."""
    path: Path
    max_images: int = MAX_IMAGES
    """Most images one request may carry."""
    stop_ids: set[int] = field(default_factory=set)
    """Tokens that end an answer: the tokenizer's end-of-turn token and the model's eos tokens."""

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", max_images: int = MAX_IMAGES) -> QAModel:
        """A mixllm checkpoint (``mixllm_config.json``) or a llava-hf one (``config.json`` with model_type
        llava), on ``device`` (bf16 on a GPU), LoRA adapters merged."""
        from mixllm.loading import from_llava, from_pretrained
        from mixllm.lora import merge_lora
        from mixllm.modeling import CONFIG_NAME

        path, device = Path(path), torch.device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if (path / CONFIG_NAME).is_file():
            kind, (model, processor) = "mixllm", from_pretrained(path, dtype=dtype)
        elif (path / "config.json").is_file() and json.loads((path / "config.json").read_text()).get("model_type") == "llava":
            kind, (model, processor) = "llava", from_llava(path, dtype=dtype)
        elif not path.is_dir():
            raise MixLLMError(f"{path}: no such checkpoint directory")
        else:
            raise MixLLMError(f"{path} is neither a mixllm checkpoint ({CONFIG_NAME}) nor a llava-hf checkpoint "
                              "(config.json with model_type llava)")
        if "image" not in model.encoders:
            raise MixLLMError(f"{path}: this model has no image modality; image question answering needs one")
        if processor is None or processor.image_processor is None:
            raise MixLLMError(f"{path}: no tokenizer or image processor beside the weights; answering needs both")
        merged = merge_lora(model.language_model)
        model.to(device).eval()
        eos = model.language_model.generation_config.eos_token_id
        stop_ids = {end_of_turn_id(processor.tokenizer), *([] if eos is None else [eos] if isinstance(eos, int) else eos)}
        logger.info("image QA model %s (%s, %d image tokens, %d LoRA layers merged) on %s", path, kind,
                    model.num_tokens["image"], merged, device)
        return cls(model, processor, kind, path, max_images, stop_ids)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return int(self.model.language_model.config.get_text_config().max_position_embeddings)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.processor.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def render(self, messages: Sequence[dict]) -> tuple[str, int]:
        """The prompt text of ``messages`` (placeholders not yet expanded) and its number of images."""
        if not messages:
            raise InputError("messages: the list is empty; send at least one user message", "messages", 0, 1)
        image_token = self.processor.token("image")
        placeholders = [self.processor.token(m) for m in self.processor.token_ids]
        flat, images = [], 0
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in ROLES:
                raise InputError(f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role",
                                 role, list(ROLES))
            text, count = self._content(message.get("content"), f"messages[{i}].content", placeholders)
            if count and role != "user":
                raise InputError(f"messages[{i}].content: only user messages may carry images, not {role} messages",
                                 f"messages[{i}].content", role)
            flat.append({"role": role, "content": f"{image_token}\n" * count + text})
            images += count
        if not any(m["role"] == "user" for m in flat):
            raise InputError("messages: there is no user message to answer", "messages")
        if images > self.max_images:
            raise InputError(f"messages: {images} images is more than the limit of {self.max_images} per request "
                             "(max_images)", "messages", images, self.max_images)
        tokenizer = self.processor.tokenizer
        if self.kind == "mixllm":
            if flat[0]["role"] != "system":
                flat.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
            return render_messages(tokenizer, flat, add_generation_prompt=True), images
        if getattr(tokenizer, "chat_template", None):
            return render_messages(tokenizer, flat, add_generation_prompt=True), images
        # LLaVA-1.5 as llava-hf's processor chat template renders it.
        turns = "".join(("" if m["role"] == "system" else m["role"].upper() + ": ") + m["content"] + " " for m in flat)
        return turns + "ASSISTANT:", images

    @staticmethod
    def _content(content, where: str, placeholders: list[str]) -> tuple[str, int]:
        """A message's text and its number of images."""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise InputError(f"{where}: expected a string or a list of parts", where)
        texts, images = [], 0
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                images += 1
            elif kind == "text" and isinstance(part.get("text"), str):
                found = [p for p in placeholders if p in part["text"]]
                if found:
                    raise InputError(f"{where}: the text holds the placeholder {found[0]!r}; send images as image "
                                     "parts", where, found[0])
                texts.append(part["text"])
            else:
                raise InputError(f"{where}[{j}]: a part is {{'type': 'text', 'text': ...}} or {{'type': 'image'}}",
                                 f"{where}[{j}]", kind)
        return "\n".join(texts), images

    def complete(self, messages: Sequence[dict], images: Sequence, settings: GenerationSettings | None = None) -> Completion:
        """The :class:`Completion` of ``messages`` with ``images`` (PIL images, in the order of the image
        parts); checks everything before any token is generated (InputError naming the field)."""
        settings = settings or GenerationSettings()
        if settings.num_beams != 1:
            raise InputError("num_beams: answers are streamed, which needs num_beams=1", "num_beams", settings.num_beams, 1)
        prompt, count = self.render(messages)
        if count != len(images):
            raise ValueError(f"the messages hold {count} image parts but {len(images)} images were given")
        batch = self.processor(prompt, images=list(images) or None, add_special_tokens=self.kind == "llava")
        prompt_tokens, context = batch["input_ids"].shape[1], self.context_length
        if prompt_tokens + settings.max_new_tokens > context:
            room = context - prompt_tokens
            if room < 1:
                raise InputError(f"messages: the prompt is {prompt_tokens} tokens, more than the model's context of "
                                 f"{context}", "messages", prompt_tokens, context)
            raise InputError(f"max_tokens: {settings.max_new_tokens} new tokens after a {prompt_tokens}-token prompt "
                             f"exceed the model's context of {context}; at most {room}", "max_tokens",
                             settings.max_new_tokens, room)
        return Completion(self, {k: v.to(self.device) for k, v in batch.items()}, settings)


def user_message(question: str, images: int = 1) -> dict:
    """One user message: ``images`` image parts, then the question."""
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}


def cli_ask(args: argparse.Namespace) -> int:
    from mixllm.image_input import open_image_file

    path = Path(args.model) if args.model else DEFAULT_QA_CHECKPOINT
    if not path.is_dir():
        if args.model is None:
            raise MixLLMError(f"no image QA model at {path}: train it with `make caption`, or pass --model DIR "
                              "(a mixllm or a llava-hf checkpoint)")
        raise MixLLMError(f"--model {path}: no such checkpoint directory")
    image = open_image_file(args.image)  # before loading the model: a bad image fails at once
    settings = GenerationSettings(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed)
    from mixllm.loading import resolve_device

    qa = QAModel.load(path, resolve_device(args.device))
    completion = qa.complete([user_message(args.question)], [image], settings)
    if args.stream:
        for delta in completion:
            print(delta, end="", flush=True)
        print()
    else:
        print("".join(completion).strip())
    logger.info("prompt %d tokens (%d image tokens), answer %d tokens, finish_reason %s", completion.prompt_tokens,
                qa.model.num_tokens["image"], completion.completion_tokens, completion.finish_reason)
    sys.stdout.flush()
    return 0
