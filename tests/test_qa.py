"""Image question answering (mixllm.qa, `mixllm ask`): streamed answers are exactly the plain greedy
answers, stop/length/cancel behave, prompts follow training, requests are checked with field names, and
a llava-hf checkpoint answers through `mixllm ask` with the tokens transformers' own LLaVA generates."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from conftest import WORDS
from mixllm.cli import main
from mixllm.conversation import SYSTEM_PROMPT, question_prompt
from mixllm.errors import InputError
from mixllm.generation import GenerationSettings, turn_prompt
from mixllm.lora import LoRALinear
from mixllm.qa import QAModel, user_message

QUESTION = "What color is the cube?"


def picture(seed: int = 0, size=(64, 48)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def plain_greedy(qa: QAModel, messages, images, max_new_tokens: int) -> list[int]:
    """The same prompt through ``model.generate`` with no streamer (what ``mixllm.generation.answer`` calls)."""
    prompt, _ = qa.render(messages)
    batch = qa.processor(prompt, images=images)
    out = qa.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=qa.processor.pad_token_id, eos_token_id=sorted(qa.stop_ids))
    return out[0].tolist()


def test_loading_merges_the_lora_adapters(qa):
    adapters = [m for m in qa.model.modules() if isinstance(m, LoRALinear)]
    assert adapters and all(m.merged for m in adapters)
    assert qa.kind == "mixllm" and qa.model.num_tokens["image"] == 49


def test_streaming_yields_exactly_the_plain_greedy_answer(qa):
    messages, images = [user_message(QUESTION)], [picture()]
    completion = qa.complete(messages, images, GenerationSettings(max_new_tokens=12))
    deltas = list(completion)
    expected = plain_greedy(qa, messages, images, 12)
    assert completion.token_ids == expected
    assert len(deltas) > 1 and all(deltas)  # streamed, not one block at the end
    assert "".join(deltas) == completion.text == qa.processor.batch_decode(torch.tensor([expected]))[0]
    assert completion.finish_reason == ("stop" if expected[-1] in qa.stop_ids else "length")
    assert completion.completion_tokens == len(expected)


def test_the_prompt_is_the_training_prompt_and_usage_counts_its_image_tokens(qa):
    tokenizer = qa.processor.tokenizer
    prompt, images = qa.render([user_message(QUESTION)])
    assert images == 1 and prompt == question_prompt(tokenizer, QUESTION, "<image>")  # SYSTEM_PROMPT included
    completion = qa.complete([user_message(QUESTION)], [picture()], GenerationSettings(max_new_tokens=2))
    text_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert completion.prompt_tokens == text_tokens - 1 + 49  # the placeholder became 49 image tokens


def test_mixllm_generate_asks_an_image_question_with_the_same_prompt_as_ask(qa):
    # `mixllm generate --image` once used the template's default system prompt, not the trained one.
    prompt, _ = qa.render([user_message(QUESTION)])
    assert turn_prompt(qa.processor, QUESTION, with_image=True) == prompt
    assert SYSTEM_PROMPT not in turn_prompt(qa.processor, QUESTION)  # text only: the template's default


def test_a_client_system_message_replaces_the_default_and_images_lead_their_message(qa):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "and this?"}, {"type": "image"}]}]
    prompt, images = qa.render(messages)
    assert images == 1 and "Be brief." in prompt and SYSTEM_PROMPT not in prompt
    assert "<image>\nand this?" in prompt and prompt.index("hello") < prompt.index("<image>")


def test_the_end_of_turn_token_stops_the_answer(qa, monkeypatch):
    messages, images = [user_message(QUESTION)], [picture(1)]
    free = plain_greedy(qa, messages, images, 8)
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    monkeypatch.setattr(qa, "stop_ids", {free[k]})  # make the k-th greedy token the end of the turn
    completion = qa.complete(messages, images, GenerationSettings(max_new_tokens=8))
    text = "".join(completion)
    assert completion.token_ids == free[: k + 1] and completion.completion_tokens == k + 1
    assert completion.finish_reason == "stop" and text == qa.decode(free[:k])  # the stop token is not text


def test_sampling_is_seeded(qa):
    def sample(seed):
        completion = qa.complete([user_message(QUESTION)], [picture()],
                                 GenerationSettings(max_new_tokens=6, temperature=1.0, seed=seed))
        list(completion)
        return completion.token_ids

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)  # a random tiny model spreads its mass over 49k tokens


def test_stopping_early_stops_the_generation(qa):
    before = {t.name for t in threading.enumerate()}
    completion = qa.complete([user_message(QUESTION)], [picture()], GenerationSettings(max_new_tokens=500))
    for _ in completion:
        break
    assert completion.completion_tokens < 500
    assert "mixllm-qa-generate" not in {t.name for t in threading.enumerate()} - before
    cancelled = qa.complete([user_message(QUESTION)], [picture()], GenerationSettings(max_new_tokens=500))
    cancelled.cancel()
    assert list(cancelled) == [] and cancelled.finish_reason == "cancelled"


@pytest.mark.parametrize("messages,field,message", [
    ([], "messages", "the list is empty"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role", "'robot' is not one of"),
    ([{"role": "system", "content": "x"}], "messages", "no user message"),
    ([{"role": "assistant", "content": [{"type": "image"}]}, user_message("q", 0)], "messages[0].content",
     "only user messages may carry images"),
    ([{"role": "user", "content": "what is <image> here"}], "messages[0].content", "the placeholder .<image>."),
    ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0]", "a part is"),
    ([user_message("two", 2)], "messages", "2 images is more than the limit of 1"),
])  # fmt: skip
def test_requests_are_checked_with_field_names(qa, messages, field, message):
    images = [picture()] * sum(p.get("type") == "image" for m in messages if isinstance(m["content"], list)
                               for p in m["content"])
    with pytest.raises(InputError, match=message) as err:
        qa.complete(messages, images)
    assert err.value.field == field and str(err.value).startswith(field)


def test_max_tokens_beyond_the_context_is_refused_with_the_room_left(qa):
    with pytest.raises(InputError, match="exceed the model's context of 2048") as err:
        qa.complete([user_message(QUESTION)], [picture()], GenerationSettings(max_new_tokens=4000))
    assert err.value.field == "max_tokens" and err.value.value == 4000 and 1900 < err.value.limit < 2048


# --- mixllm ask ------------------------------------------------------------------------------------
LLAVA_IMAGE_TOKEN, LLAVA_VOCAB = 100, 128


def _tiny_llava_with_processor(path):
    """A tiny random llava-hf checkpoint (as in test_llava_compat) with what llava-hf ships beside it: a
    tokenizer whose ``<image>`` is the config's image token id, and a CLIP image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, PreTrainedTokenizerFast)

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=LLAVA_VOCAB, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE_TOKEN)
                                  ).eval().save_pretrained(path)
    names = ["<pad>", "<s>", "</s>", "<unk>", *WORDS, "USER", "ASSISTANT", ":"]
    names += [f"w{i}" for i in range(len(names), LLAVA_VOCAB)]
    names[LLAVA_IMAGE_TOKEN] = "<image>"
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<image>") == LLAVA_IMAGE_TOKEN
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_a_llava_hf_checkpoint_answers_through_ask_with_transformers_greedy_tokens(tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    path = _tiny_llava_with_processor(tmp_path / "llava")
    picture(5, (40, 40)).save(tmp_path / "photo.png")
    question = "what is this image"
    assert main(["ask", str(tmp_path / "photo.png"), question, "--model", str(path), "--max-tokens", "8",
                 "--device", "cpu"]) == 0
    answer = capsys.readouterr().out.strip()
    assert main(["ask", str(tmp_path / "photo.png"), question, "--model", str(path), "--max-tokens", "8",
                 "--device", "cpu", "--stream"]) == 0
    streamed = capsys.readouterr().out.strip()

    # transformers' own LLaVA on llava-hf's prompt format, image tokens expanded as its processor does.
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = LlavaForConditionalGeneration.from_pretrained(path).eval()
    prompt = f"USER: {'<image>' * 16}\n{question} ASSISTANT:"  # 32 px / 8 px patches = 16 tokens, CLS dropped
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    pixel_values = AutoImageProcessor.from_pretrained(path)(images=Image.open(tmp_path / "photo.png"),
                                                            return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = reference.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    assert len(expected.split()) >= 4 and answer == expected and streamed == expected, (expected, answer, streamed)


def test_ask_reports_a_bad_image_and_a_missing_model_in_one_line(tmp_path, qa_dir, capsys, monkeypatch):
    (tmp_path / "photo.gif").write_bytes(b"GIF89a" + b"\0" * 30)
    assert main(["ask", str(tmp_path / "photo.gif"), "what?", "--model", str(qa_dir)]) == 2
    err = capsys.readouterr().err
    assert "photo.gif: a GIF image; only PNG, JPEG and WebP are accepted" in err and "Traceback" not in err
    monkeypatch.setattr("mixllm.qa.DEFAULT_QA_CHECKPOINT", tmp_path / "scenes_qa")
    assert main(["ask", str(tmp_path / "photo.gif"), "what?"]) == 2
    err = capsys.readouterr().err
    assert "no image QA model at" in err and "make caption" in err and "--model" in err
