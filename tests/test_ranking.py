import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, make_language_model, make_tokenizer
from mixllm.config import ItemConfig, MixLLMConfig
from mixllm.errors import DataError
from mixllm.loading import build
from mixllm.processor import MixLLMProcessor, register_placeholder_tokens
from mixllm.ranking import (
    ItemCatalog,
    MixLLMRanker,
    RankingPromptBuilder,
    RankingRequest,
    RankingTemplate,
    block_position_ids,
    build_block_mask,
)

F = 8  # item feature width
N_ITEMS = 30
# Several template tokens per segment, so causality inside a segment is exercised.
TEMPLATE = RankingTemplate(prefix="the user watched{history} rank", segment="{item} what is good", text_item=" {text}")


def _texts(n: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=length)) for _ in range(n)]


def _catalog(length: int = 5) -> ItemCatalog:
    return ItemCatalog(texts=_texts(N_ITEMS, length), features=torch.randn(N_ITEMS, F, generator=torch.Generator().manual_seed(0)))


def _ranker(mode="student", arch="llama", attn="eager", scoring="head", template=TEMPLATE, tokens_per_item=2, catalog=None, lm_path="unused"):
    torch.manual_seed(0)
    item = ItemConfig(feature_dim=F, num_items=N_ITEMS, id_dim=4, tokens_per_item=tokens_per_item, projector="linear")
    config = MixLLMConfig(language_model=str(lm_path), item=item if mode == "student" else None)
    lm = make_language_model(arch)
    if attn != "eager":
        lm.set_attn_implementation(attn)
    model, processor = build(config, language_model=lm, tokenizer=make_tokenizer())
    return MixLLMRanker(model, processor, catalog or _catalog(), mode=mode, template=template, scoring=scoring).eval()


def _separate_scores(ranker: MixLLMRanker, request: RankingRequest) -> torch.Tensor:
    """Reference: one ordinary causal forward of prefix + candidate per candidate, no block mask."""
    out = []
    for c in request.candidates:
        p = ranker.build_prompt(RankingRequest(request.history, [c]))
        ids = torch.tensor([p.input_ids])
        embeds = ranker.model.embed_inputs(ids, item_features=p.item_features, item_ids=p.item_ids)
        if ranker.scoring == "head":
            hidden = ranker.model.language_model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            out.append(ranker.score_head(hidden[0, -1])[0])
        else:  # the full LM head's logit, independent of the ranker's gather
            out.append(ranker.model.language_model(inputs_embeds=embeds).logits[0, -1, ranker.answer_token_id])
    return torch.stack(out)


REQUEST = RankingRequest(history=[3, 17, 5, 9], candidates=[8, 2, 40 % N_ITEMS, 21, 2])  # a duplicate candidate too


# --- block mask and positions --------------------------------------------------------------------
def test_block_mask_and_positions_by_hand():
    mask = build_block_mask(2, [2, 1], total_len=6)  # prefix p p, segment a a, segment b, one pad
    assert mask.shape == (1, 1, 6, 6)
    allowed = (mask[0, 0] == 0).int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],  # p0
        [1, 1, 0, 0, 0, 0],  # p1
        [1, 1, 1, 0, 0, 0],  # a0: prefix + itself
        [1, 1, 1, 1, 0, 0],  # a1: prefix + a0 + itself
        [1, 1, 0, 0, 1, 0],  # b0: prefix + itself, not segment a
        [0, 0, 0, 0, 0, 1],  # pad: itself only (no fully masked row)
    ])  # fmt: skip
    assert torch.equal(allowed, expected)
    assert mask.min() == torch.finfo(torch.float32).min
    assert build_block_mask(2, [2, 1], torch.bfloat16).dtype == torch.bfloat16
    assert block_position_ids(2, [2, 1], total_len=6).tolist() == [[0, 1, 2, 3, 2, 0]]


# --- one forward == separate forwards -----------------------------------------------------------
@pytest.mark.parametrize("mode", ["teacher", "student"])
def test_one_forward_matches_separate_forwards(arch, mode):
    ranker = _ranker(mode, arch)
    with torch.no_grad():
        (together,) = ranker.score([REQUEST])
        alone = _separate_scores(ranker, REQUEST)
    assert together.shape == (5,)
    assert torch.allclose(together, alone, atol=1e-5), (arch, mode, together, alone)
    assert torch.allclose(together[1], together[4], atol=1e-5)  # the same candidate twice scores the same


@pytest.mark.parametrize("mode", ["teacher", "student"])
def test_one_forward_matches_separate_forwards_under_sdpa(mode):
    ranker = _ranker(mode, "llama", attn="sdpa")
    assert ranker.model.language_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        (together,) = ranker.score([REQUEST])
        alone = _separate_scores(ranker, REQUEST)
    assert torch.allclose(together, alone, atol=1e-5)


def test_answer_token_scores_are_the_lm_logit_of_yes():
    ranker = _ranker("teacher", "qwen2", scoring="answer_token", template=TEMPLATE)
    ranker_yes = MixLLMRanker(ranker.model, ranker.processor, ranker.catalog, "teacher", TEMPLATE, "answer_token", answer_token="yes")
    assert ranker.score_head is None and ranker_yes.answer_token_id == ranker.processor.tokenizer.convert_tokens_to_ids("yes")
    with torch.no_grad():
        (together,) = ranker_yes.score([REQUEST])
        alone = _separate_scores(ranker_yes, REQUEST)
    assert torch.allclose(together, alone, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        MixLLMRanker(ranker.model, ranker.processor, ranker.catalog, "teacher", TEMPLATE, "answer_token", answer_token="yes no")


@pytest.mark.parametrize("mode", ["teacher", "student"])
def test_padded_batch_of_requests_matches_each_request_alone(mode):
    ranker = _ranker(mode, "llama")
    requests = [
        RankingRequest(history=[1, 2, 3, 4, 5, 6], candidates=[7, 8]),
        RankingRequest(history=[], candidates=[9, 10, 11, 12]),  # no history, more candidates
        RankingRequest(history=[13], candidates=[14]),
    ]
    with torch.no_grad():
        inputs = ranker.prepare(requests)
        batched = ranker(inputs)
        alone = [ranker.score([r])[0] for r in requests]
    assert batched.shape == (3, 4)
    assert inputs.candidate_mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert torch.all(batched[~inputs.candidate_mask] == 0)
    for row, (scores, r) in enumerate(zip(alone, requests)):
        assert torch.allclose(batched[row, : len(r.candidates)], scores, atol=1e-5), row


@pytest.mark.parametrize("mode", ["teacher", "student"])
def test_permuting_candidates_permutes_scores(mode):
    ranker = _ranker(mode, "llama")
    candidates = [4, 11, 0, 23, 7, 19, 2]
    perm = [5, 2, 6, 0, 3, 1, 4]
    with torch.no_grad():
        (scores,) = ranker.score([RankingRequest([1, 2, 3], candidates)])
        (permuted,) = ranker.score([RankingRequest([1, 2, 3], [candidates[i] for i in perm])])
    assert torch.allclose(permuted, scores[perm], atol=1e-4)
    assert scores.std() > 1e-3  # the check is not vacuous: candidates do score differently


# --- prompts and token counts --------------------------------------------------------------------
def test_student_prompt_places_item_tokens_and_gathers_features_in_placeholder_order():
    ranker = _ranker("student", "llama", tokens_per_item=2)
    item_id = ranker.model.config.token_ids["item"]
    prompt = ranker.build_prompt(RankingRequest(history=[3, 17, 5], candidates=[8, 2]))
    assert prompt.prefix_ids.count(item_id) == 3 * 2  # k = 2 tokens per history item
    assert [s.count(item_id) for s in prompt.segment_ids] == [2, 2]
    assert prompt.segment_ids[0][:2] == [item_id, item_id]  # segment = "{item} what is good"
    assert prompt.item_ids.tolist() == [3, 17, 5, 8, 2]
    assert torch.equal(prompt.item_features, ranker.catalog.features[[3, 17, 5, 8, 2]])
    # The merged embeddings at candidate 2's placeholders are its projected features.
    inputs = ranker.prepare([RankingRequest(history=[3, 17, 5], candidates=[8, 2])])
    embeds = ranker.model.embed_inputs(inputs.input_ids, item_features=inputs.item_features, item_ids=inputs.item_ids)
    start = prompt.prefix_len + len(prompt.segment_ids[0])
    expected = ranker.model.get_item_features(ranker.catalog.features[[2]], torch.tensor([2]))[0]  # (k, D)
    assert torch.allclose(embeds[0, start : start + 2], expected, atol=1e-6)


def test_token_count_is_prefix_plus_segments():
    for mode in ("teacher", "student"):
        ranker = _ranker(mode, "llama")
        request = RankingRequest(history=[1, 2, 3], candidates=[4, 5, 6, 7])
        prompt = ranker.build_prompt(request)
        inputs = ranker.prepare([request])
        assert prompt.num_tokens == prompt.prefix_len + sum(prompt.segment_lens) == inputs.input_ids.shape[1]
        assert inputs.num_tokens == [prompt.num_tokens]
        separate = sum(prompt.prefix_len + n for n in prompt.segment_lens)
        assert prompt.num_tokens < separate  # the prefix is paid once, not C times
    student = _ranker("student", "llama", tokens_per_item=2)
    one_segment = student.build_prompt(RankingRequest([1], [4])).segment_lens[0]
    assert one_segment == 2 + 3  # k item tokens + "what is good"


def test_student_prompt_is_ten_times_shorter_than_teacher_for_16_token_items():
    catalog = _catalog(length=16)  # 16 words = 16 tokens with the tiny word-level tokenizer
    request = RankingRequest(history=list(range(10)), candidates=list(range(10, 30)))
    teacher = _ranker("teacher", catalog=catalog, template=RankingTemplate()).build_prompt(request)
    student = _ranker("student", catalog=catalog, template=RankingTemplate(), tokens_per_item=1).build_prompt(request)
    assert student.segment_lens == [1] * 20 and teacher.segment_lens == [16] * 20
    assert teacher.num_tokens >= 10 * student.num_tokens, (teacher.num_tokens, student.num_tokens)


# --- training signal ----------------------------------------------------------------------------
def test_gradients_reach_score_head_and_item_projector_not_the_frozen_llm():
    ranker = _ranker("student", "llama").train()
    inputs = ranker.prepare([RankingRequest([1, 2], [3, 4, 5]), RankingRequest([6], [7, 8])])
    raw = ranker(inputs)
    raw.retain_grad()
    scores = raw.masked_fill(~inputs.candidate_mask, float("-inf"))
    loss = -torch.log_softmax(scores, dim=-1)[:, 0].sum()  # listwise: first candidate is the positive
    loss.backward()
    # The head has no bias: a listwise loss cannot train one (see test_listwise_loss_gradient_sums_to_zero...).
    assert [n for n, _ in ranker.score_head.named_parameters()] == ["weight"]
    for name, p in ranker.named_parameters():
        if name.startswith("model.language_model."):
            assert p.grad is None, name
        else:
            # Every trainable parameter moves the scores non-uniformly across candidates, so its
            # gradient is non-zero in exact arithmetic, not by rounding: 1e-8 sits orders of
            # magnitude below these gradients (~1e-3..1) and far above float32 noise on exact zeros.
            assert p.grad is not None and p.grad.abs().sum() > 1e-8, name
    # The listwise loss's gradient w.r.t. each request's real scores sums to zero (softmax - one-hot):
    # the reason a shared bias gets no gradient. |sum| <= C * eps * max|grad| with eps = 1.2e-7.
    grad = raw.grad.masked_fill(~inputs.candidate_mask, 0.0)
    assert torch.all(grad.sum(-1).abs() <= 1e-6), grad.sum(-1)
    assert any(n.startswith("model.projectors.item.") for n, _ in ranker.named_parameters())


def test_checkpoint_with_a_stored_score_head_bias_loads_without_it(tmp_path, tiny_lm_dir):
    """Checkpoints written before the bias was dropped (e.g. the committed ones) still load: the
    stored bias is ignored, which shifts every candidate's score by the same constant, so scores
    equal the bias-free head's and rankings/softmax equal the old head's."""
    from safetensors.torch import save_file

    catalog = _catalog()
    ranker = _ranker("student", lm_path=tiny_lm_dir, catalog=catalog)
    ranker.save_pretrained(tmp_path / "ckpt")
    head = load_file(str(tmp_path / "ckpt" / "ranker_head.safetensors"))
    assert set(head) == {"weight"}
    bias = torch.tensor([3.5])
    save_file({"weight": head["weight"], "bias": bias}, str(tmp_path / "ckpt" / "ranker_head.safetensors"))
    loaded = MixLLMRanker.from_pretrained(tmp_path / "ckpt", catalog)
    assert loaded.score_head.bias is None
    with torch.no_grad():
        expected = ranker.score([REQUEST])[0]
        got = loaded.score([REQUEST])[0]
    assert torch.allclose(got, expected, atol=1e-6)
    old = expected + bias  # what the old head with its bias gave
    assert torch.allclose(torch.softmax(old, -1), torch.softmax(got, -1), atol=1e-6)


# --- errors -------------------------------------------------------------------------------------
def test_errors_name_the_request_and_the_problem():
    ranker = _ranker("student", "llama")
    with pytest.raises(DataError, match="request 1: the candidate list is empty"):
        ranker.score([REQUEST, RankingRequest([1], [])])
    with pytest.raises(DataError, match="request 0 candidates: item id 99 is not in the catalog"):
        ranker.score([RankingRequest([1], [2, 99])])
    with pytest.raises(DataError, match="request 0 history: item id -1 is not in the catalog"):
        ranker.score([RankingRequest([-1, 2], [3])])
    with pytest.raises(DataError, match="requests: the batch is empty"):
        ranker.score([])
    builder = ranker.prompts
    with pytest.raises(DataError, match="history: 3 feature row\\(s\\) but 2 id\\(s\\)"):
        builder.student(torch.randn(3, F), torch.randn(1, F), history_ids=[1, 2], candidate_ids=[3])
    with pytest.raises(DataError, match="only one of history and candidates"):
        builder.student(torch.randn(3, F), candidate_ids=[3])
    with pytest.raises(DataError, match="width 5 but the item encoder expects 8"):
        MixLLMRanker(ranker.model, ranker.processor, ItemCatalog(features=torch.randn(N_ITEMS, 5)))
    with pytest.raises(DataError, match="31 items but the id embedding holds 30"):
        MixLLMRanker(ranker.model, ranker.processor, ItemCatalog(features=torch.randn(N_ITEMS + 1, F)))
    with pytest.raises(DataError, match="3 texts but 2 feature rows"):
        ItemCatalog(texts=["a", "b", "c"], features=torch.randn(2, F))
    with pytest.raises(DataError, match="teacher reads item texts"):
        MixLLMRanker(ranker.model, ranker.processor, ItemCatalog(features=torch.randn(N_ITEMS, F)), mode="teacher")
    teacher = _ranker("teacher", "llama")
    with pytest.raises(DataError, match="the student needs a model with the item modality"):
        MixLLMRanker(teacher.model, teacher.processor, teacher.catalog, mode="student")


def test_history_over_max_positions_raises_data_error():
    catalog = _catalog(length=16)
    ranker = _ranker("teacher", "gpt2", catalog=catalog)
    ranker.score([RankingRequest(list(range(25)), [0, 1])])  # 4 + 25 * 16 prefix + 19 = 423 positions: fine
    request = RankingRequest(list(range(N_ITEMS)) + list(range(5)), [0, 1])  # 35 items: 4 + 35 * 16 + 19 = 583
    with pytest.raises(DataError, match=r"request 0: the prefix \(564 tokens, 35 history items\) plus the longest "
                                        r"candidate \(19 tokens\) needs 583 positions but the model allows 512"):
        ranker.score([request])


def test_teacher_text_holding_a_placeholder_is_rejected():
    ranker = _ranker("student", "llama")
    teacher = MixLLMRanker(ranker.model, ranker.processor, ItemCatalog(texts=["a <item> b"] * N_ITEMS), mode="teacher", template=TEMPLATE)
    with pytest.raises(DataError, match="request 0: item: the text has"):
        teacher.score([RankingRequest([0], [1])])


# --- checkpoints --------------------------------------------------------------------------------
def test_score_head_round_trip(tmp_path, tiny_lm_dir):
    catalog = _catalog()
    ranker = _ranker("student", lm_path=tiny_lm_dir, catalog=catalog)
    with torch.no_grad():
        for p in [*ranker.score_head.parameters(), *ranker.model.projectors.parameters()]:
            p.add_(0.25)  # trained parts differ from any fresh init
        expected = ranker.score([REQUEST])[0]
    ranker.save_pretrained(tmp_path / "ckpt", provenance={"data": "unit-test"})
    head = load_file(str(tmp_path / "ckpt" / "ranker_head.safetensors"))
    assert set(head) == {"weight"} and torch.equal(head["weight"], ranker.score_head.weight.detach())
    torch.manual_seed(123)
    loaded = MixLLMRanker.from_pretrained(tmp_path / "ckpt", catalog)
    assert loaded.mode == "student" and loaded.prompts.template == TEMPLATE
    with torch.no_grad():
        got = loaded.score([REQUEST])[0]
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(DataError, match="ranker_config.json is missing"):
        MixLLMRanker.from_pretrained(tiny_lm_dir, catalog)


def test_student_checkpoint_stores_its_catalog_features_and_max_history(tmp_path, tiny_lm_dir):
    catalog = _catalog()
    ranker = _ranker("student", lm_path=tiny_lm_dir, catalog=catalog)
    ranker.max_history = 4
    with torch.no_grad():
        expected = ranker.score([REQUEST])[0]
    ranker.save_pretrained(tmp_path / "ckpt")
    stored = load_file(str(tmp_path / "ckpt" / "catalog_features.safetensors"))["features"]
    assert torch.equal(stored, catalog.features)
    loaded = MixLLMRanker.from_pretrained(tmp_path / "ckpt")  # no catalog: the stored features serve
    assert loaded.max_history == 4 and torch.equal(loaded.catalog.features, catalog.features)
    with torch.no_grad():
        assert torch.allclose(loaded.score([REQUEST])[0], expected, atol=1e-6)
    with pytest.raises(DataError, match=r"request 0: the history has 5 items but this ranker reads at most 4 \(max_history\)"):
        loaded.score([RankingRequest(history=[1, 2, 3, 4, 5], candidates=[6, 7])])
    teacher = _ranker("teacher", lm_path=tiny_lm_dir)
    teacher.save_pretrained(tmp_path / "teacher")
    assert not (tmp_path / "teacher" / "catalog_features.safetensors").exists()
    with pytest.raises(DataError, match="stores no item features"):
        MixLLMRanker.from_pretrained(tmp_path / "teacher")


# --- integration: the real SmolLM2 and MovieLens ------------------------------------------------
@pytest.fixture(scope="module")
def movielens_texts():
    from mixllm.data import load_movielens_100k

    return load_movielens_100k().item_texts


@pytest.mark.integration
def test_real_tokenizer_student_prompt_is_ten_times_shorter(movielens_texts):
    from transformers import AutoTokenizer

    from mixllm.assets import asset_path

    tokenizer = AutoTokenizer.from_pretrained(asset_path("smollm2-135m-instruct"))
    token_ids = register_placeholder_tokens(tokenizer, {"item": "<item>"})
    builder = RankingPromptBuilder(MixLLMProcessor(tokenizer, token_ids, {"item": 1}))
    history, candidates = movielens_texts[:10], movielens_texts[100:120]
    teacher = builder.teacher(history, candidates)
    student = builder.student(torch.zeros(10, 4), torch.zeros(20, 4))
    print(f"teacher {teacher.num_tokens} (prefix {teacher.prefix_len}), student {student.num_tokens} "
          f"(prefix {student.prefix_len}), ratio {teacher.num_tokens / student.num_tokens:.1f}")
    assert student.segment_lens == [1] * 20
    assert teacher.num_tokens >= 10 * student.num_tokens


@pytest.mark.integration
def test_real_smollm2_one_forward_matches_separate_forwards(movielens_texts):
    from mixllm.assets import asset_path

    torch.manual_seed(0)
    item = ItemConfig(feature_dim=F, num_items=0, projector="linear")
    model, processor = build(MixLLMConfig(language_model=str(asset_path("smollm2-135m-instruct")), item=item))
    catalog = ItemCatalog(texts=movielens_texts[:60], features=torch.randn(60, F))
    request = RankingRequest(history=list(range(10)), candidates=[40, 41, 42, 43, 44])
    for mode, scoring in (("teacher", "answer_token"), ("teacher", "head"), ("student", "head")):
        ranker = MixLLMRanker(model, processor, catalog, mode=mode, scoring=scoring).eval()
        with torch.no_grad():
            (together,) = ranker.score([request])
            alone = _separate_scores(ranker, request)
        print(f"{mode}/{scoring}: max |one forward - separate| = {(together - alone).abs().max():.2e}")
        assert torch.allclose(together, alone, atol=1e-4), (mode, scoring, (together - alone).abs().max())
