"""Building and loading mixllm models: base LLM + tokenizer + modalities -> (model, processor).

* ``build(config)`` — a fresh model from a config (the base LLM loaded from its asset or path).
* ``from_pretrained(dir)`` — a mixllm checkpoint written by ``MixLLMForCausalLM.save_pretrained``.
* ``from_llava(dir)`` — a llava-hf checkpoint (what transformers' ``LlavaForConditionalGeneration
  .save_pretrained`` writes), giving the same logits as transformers' implementation.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from mixllm.config import ImageConfig, MixLLMConfig
from mixllm.errors import DataError, MixLLMError
from mixllm.modeling import CONFIG_NAME, MixLLMForCausalLM
from mixllm.processor import MixLLMProcessor, register_placeholder_tokens

logger = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    """A ``--device`` setting (``auto``, ``cpu`` or ``cuda``) -> the device: ``auto`` is the GPU when torch
    sees one; ``cuda`` without one is a DataError naming the setting."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DataError("--device cuda: no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def tiny_language_model(seed: int, hidden: int = 32, **overrides):
    """A 2-layer random Llama ``hidden`` wide over the SmolLM2 tokenizer (its chat template too), built in
    memory: the base LLM of the tiny recipes and of the tests. Its weights are drawn after
    ``torch.manual_seed(seed)``, which leaves torch's global generator moved on; wrap the call in
    ``torch.random.fork_rng`` where that matters. ``overrides``: more ``LlamaConfig`` fields.

    Returns: ``(model in eval mode, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from mixllm.assets import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def load_language_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers causal LM and its tokenizer from a packaged asset name or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixllm.assets import resolve_model_path

    path = resolve_model_path(str(name_or_path))
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    logger.info("loaded language model %s (%s) in %.1fs", name_or_path, type(model).__name__, time.perf_counter() - start)
    return model, tokenizer


def _llava_parts(path: str | Path, dtype: torch.dtype):
    """The language model (as a plain causal LM), vision tower, projector weights and config of a
    llava-hf checkpoint, loaded through transformers' own class so its key conventions apply."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    text_config = llava.config.text_config
    lm = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    getattr(lm, lm.base_model_prefix).load_state_dict(llava.model.language_model.state_dict())
    lm.get_output_embeddings().load_state_dict(llava.lm_head.state_dict())
    lm.eval()
    return lm, llava.model.vision_tower, llava.model.multi_modal_projector.state_dict(), llava.config


def _image_processor(config: MixLLMConfig):
    if config.image is None:
        return None
    if config.image.encoder == "efficientnet-lite0":
        from mixllm.image_processing import ImageProcessor

        return ImageProcessor(size=config.image.image_size)
    from transformers import AutoImageProcessor

    try:
        hf = AutoImageProcessor.from_pretrained(config.image.path)
    except (OSError, ValueError):
        logger.warning("no image processor in %s: pass pixel_values tensors", config.image.path)
        return None
    return lambda images: hf(images=images, return_tensors="pt")["pixel_values"]


def build(
    config: MixLLMConfig,
    language_model: nn.Module | None = None,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
) -> tuple[MixLLMForCausalLM, MixLLMProcessor | None]:
    """A mixllm model and its processor for ``config``.

    The placeholder tokens are registered with the tokenizer and their ids recorded in
    ``config.token_ids`` (a checkpoint's recorded ids must match). ``language_model`` and
    ``tokenizer`` may be passed in to skip loading (tests, notebooks).
    """
    image_tower = None
    projector_state = None
    if config.language_model_source == "llava":
        lm, image_tower, projector_state, llava_config = _llava_parts(config.language_model, dtype)
        language_model = language_model or lm
        config.token_ids = {"image": int(llava_config.image_token_id), **config.token_ids}
    elif language_model is None:
        language_model, loaded_tokenizer = load_language_model(config.language_model, dtype)
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None and config.language_model_source != "llava":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.language_model)
    if tokenizer is not None:
        wanted = {m: getattr(config, m).token for m in config.modalities if m not in ("image",) or config.language_model_source != "llava"}
        registered = register_placeholder_tokens(tokenizer, wanted)
        for name, token_id in registered.items():
            recorded = config.token_ids.get(name)
            if recorded is not None and recorded != token_id:
                raise MixLLMError(
                    f"{name} placeholder {wanted[name]!r} has id {token_id} in this tokenizer but the checkpoint "
                    f"recorded {recorded}: the checkpoint was made with another base model"
                )
        config.token_ids = {**config.token_ids, **registered}
    model = MixLLMForCausalLM(config, language_model, image_tower=image_tower)
    if projector_state is not None:
        model.projectors["image"].load_state_dict(projector_state)
    processor = None
    if tokenizer is not None:
        processor = MixLLMProcessor(tokenizer, config.token_ids, model.num_tokens, image_processor=_image_processor(config))
    model.eval()
    return model, processor


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MixLLMForCausalLM, MixLLMProcessor | None]:
    """Load a mixllm checkpoint: the config, the referenced base LLM, then the trained parts."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise MixLLMError(f"{path} is not a mixllm checkpoint: {CONFIG_NAME} is missing")
    meta = json.loads(config_file.read_text())
    config = MixLLMConfig.from_dict(meta["config"])
    model, processor = build(config, dtype=dtype)
    model.load_trained_weights(path)
    model.eval()
    return model, processor


def from_llava(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MixLLMForCausalLM, MixLLMProcessor | None]:
    """Load a llava-hf checkpoint directory into mixllm (image modality, LLaVA-1.5 selection)."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") != "llava":
        raise MixLLMError(f"{path} is not a llava-hf checkpoint (model_type={raw.get('model_type')!r})")
    config = MixLLMConfig(
        language_model=str(path),
        language_model_source="llava",
        image=ImageConfig(
            encoder="hf",
            path=str(path),
            vision_feature_layer=raw.get("vision_feature_layer", -2),
            vision_feature_select_strategy=raw.get("vision_feature_select_strategy", "default"),
            projector="mlp2x_gelu",
            projector_bias=raw.get("multimodal_projector_bias", True),
        ),
    )
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return build(config, tokenizer=tokenizer, dtype=dtype)
