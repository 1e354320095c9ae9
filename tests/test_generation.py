import pytest
import torch

from conftest import make_language_model, make_tokenizer
from mixllm.cli import main
from mixllm.config import ItemConfig, MixLLMConfig
from mixllm.errors import DataError
from mixllm.generation import GenerationSettings, answer
from mixllm.loading import build


def test_settings_validate_with_field_names():
    with pytest.raises(DataError, match="top_p"):
        GenerationSettings(top_p=0)
    with pytest.raises(DataError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    assert GenerationSettings(temperature=0.7).generate_kwargs()["do_sample"] is True
    assert GenerationSettings().generate_kwargs()["do_sample"] is False


def test_answer_decodes_only_new_tokens():
    torch.manual_seed(0)
    model, processor = build(MixLLMConfig(language_model="x", item=ItemConfig(feature_dim=4)),
                             language_model=make_language_model(), tokenizer=make_tokenizer())
    text = answer(model, processor, "what is good", settings=GenerationSettings(max_new_tokens=3))
    assert isinstance(text, str) and "what is good" not in text


def test_generate_cli_reports_a_missing_image_without_traceback(capsys):
    assert main(["generate", "--prompt", "hi", "--image", "/no/such.png"]) == 2
    err = capsys.readouterr().err
    assert "--image: no such file /no/such.png" in err and "Traceback" not in err


@pytest.mark.integration
def test_generate_cli_answers_paris_with_packaged_smollm2(capsys):
    assert main(["generate", "--prompt", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
