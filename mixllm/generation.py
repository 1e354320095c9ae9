"""Answering prompts (optionally with an image) with a mixllm model, and the `generate` and `demo`
commands."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import torch

from mixllm.conversation import question_prompt
from mixllm.errors import DataError, MixLLMError

logger = logging.getLogger(__name__)

DEFAULT_LM = "smollm2-135m-instruct"


@dataclass
class GenerationSettings:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    seed: int | None = None
    """Seeds torch's generator before sampling (:mod:`mixllm.qa`), so the same request samples the same answer."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise DataError(f"max_new_tokens must be in [1, 4096], got {self.max_new_tokens}")
        if self.temperature < 0:
            raise DataError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DataError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise DataError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise DataError(f"seed must be in [0, 2**63), got {self.seed}")

    def generate_kwargs(self) -> dict:
        if self.temperature > 0:
            return dict(max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                        top_p=self.top_p, num_beams=self.num_beams)
        return dict(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=self.num_beams)


def turn_prompt(processor, prompt: str, with_image: bool = False) -> str:
    """The prompt text of one chat turn. With an image it is the image-QA prompt that training and
    `mixllm ask` use (the placeholder first, :data:`~mixllm.conversation.SYSTEM_PROMPT`), so an image
    QA checkpoint is asked the same way through every command; without one, the template's own default."""
    if with_image:
        return question_prompt(processor.tokenizer, prompt, processor.token("image"))
    return processor.chat_prompt(prompt)


def answer(model, processor, prompt: str, image=None, settings: GenerationSettings | None = None) -> str:
    """One chat turn: ``prompt`` (and an optional PIL image, placed before the text) -> the answer."""
    settings = settings or GenerationSettings()
    text = turn_prompt(processor, prompt, with_image=image is not None)
    batch = processor(text, images=[image] if image is not None else None)
    out = model.generate(**batch, pad_token_id=processor.pad_token_id, **settings.generate_kwargs())
    return processor.batch_decode(out[:1])[0].strip()


def load_for_generation(checkpoint: str | None, with_image: bool = False):
    """A mixllm checkpoint, or the base SmolLM2 (with an untrained image projector if asked)."""
    from mixllm.config import ImageConfig, MixLLMConfig
    from mixllm.loading import build, from_pretrained

    if checkpoint:
        return from_pretrained(checkpoint)
    config = MixLLMConfig(language_model=DEFAULT_LM, image=ImageConfig() if with_image else None)
    return build(config)


def cli_generate(args: argparse.Namespace) -> int:
    from mixllm.image_input import open_image_file

    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.num_beams)
    image = open_image_file(args.image, field="--image") if args.image else None
    torch.manual_seed(args.seed)
    model, processor = load_for_generation(args.checkpoint)
    if processor is None:
        raise MixLLMError("this checkpoint has no tokenizer; generation needs one")
    if image is not None and "image" not in model.encoders:
        raise DataError("--image: this model has no image modality; pass a --checkpoint with an image projector")
    print(answer(model, processor, args.prompt, image, settings))
    return 0


def cli_demo(args: argparse.Namespace) -> int:
    """Fetch the assets, load SmolLM2 through mixllm with the image modality (EfficientNet-Lite0),
    answer a prompt, and show the image path's shapes; print each step's time."""
    from PIL import Image

    from mixllm.assets import ASSETS, fetch_asset

    timings: list[tuple[str, float]] = []

    def step(name: str, fn):
        start = time.perf_counter()
        result = fn()
        timings.append((name, time.perf_counter() - start))
        print(f"[{timings[-1][1]:6.1f}s] {name}", flush=True)
        return result

    for name in ASSETS:
        path = step(f"asset {name}", lambda n=name: fetch_asset(n))
        print(f"          -> {path}")
    model, processor = step("load SmolLM2-135M-Instruct + EfficientNet-Lite0 through mixllm", lambda: load_for_generation(None, with_image=True))
    lm = model.language_model
    print(f"          language model: {type(lm).__name__}, {sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M params, "
          f"hidden {lm.config.hidden_size}; placeholder ids {model.config.token_ids}")
    text = step(f"answer {args.prompt!r} (greedy)", lambda: answer(model, processor, args.prompt))
    print(f"          answer: {text}")
    # The image path, end to end up to the merged embeddings (the projector is untrained here).
    image = Image.linear_gradient("L").resize((320, 240)).convert("RGB")
    prompt = turn_prompt(processor, "What is in this picture?", with_image=True)
    batch = step("process an image prompt", lambda: processor(prompt, images=[image]))
    with torch.no_grad():
        feats = step("EfficientNet-Lite0 + projector", lambda: model.get_image_features(batch["pixel_values"]))
        embeds = step("merge into the token embeddings", lambda: model.embed_inputs(batch["input_ids"], pixel_values=batch["pixel_values"]))
    print(f"          image -> {tuple(feats.shape)} tokens; prompt {batch['input_ids'].shape[1]} tokens -> inputs_embeds {tuple(embeds.shape)}")
    print("\nstep times:")
    for name, seconds in timings:
        print(f"  {seconds:7.2f}s  {name}")
    return 0
