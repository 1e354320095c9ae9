"""User tokens (User-LLM) in ranking prompts: placement, counts, batching, use and checkpoints."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_language_model, make_tokenizer
from mixllm.config import ItemConfig, MixLLMConfig, UserConfig
from mixllm.data.evaluation import RankingBatch
from mixllm.data.split import PAD
from mixllm.errors import DataError
from mixllm.item_cache import ItemTokenCache
from mixllm.loading import build
from mixllm.ranking import ItemCatalog, MixLLMRanker, ProtocolRanker, RankingRequest, RankingTemplate

F, F_USER = 8, 6  # item-token features and user-encoder features: different tables, different widths
N_ITEMS = 30
H = 3  # history items read as item tokens (max_history)
U = 8  # history items read by the user encoder (UserConfig.max_history)
M = 3  # user tokens
# Every word is in the tiny tokenizer's vocabulary, so token positions can be counted by hand.
TEMPLATE = RankingTemplate(prefix="the user watched{history} rank", segment="{item} what is good", text_item=" {text}",
                           user=" this user{user}")  # fmt: skip


def _catalog() -> ItemCatalog:
    g = torch.Generator().manual_seed(0)
    return ItemCatalog(features=torch.randn(N_ITEMS, F, generator=g), user_features=torch.randn(N_ITEMS, F_USER, generator=g))


def _ranker(user: bool = True, catalog: ItemCatalog | None = None, template=TEMPLATE, lm_path="unused", **kwargs) -> MixLLMRanker:
    torch.manual_seed(0)
    item = ItemConfig(feature_dim=F, num_items=0, tokens_per_item=1, projector="linear")
    user_config = UserConfig(item_dim=F_USER, num_tokens=M, hidden_dim=16, num_heads=2, max_history=U, projector="linear")
    config = MixLLMConfig(language_model=str(lm_path), item=item, user=user_config if user else None)
    model, processor = build(config, language_model=make_language_model("llama"), tokenizer=make_tokenizer())
    if catalog is None:
        catalog = _catalog() if user else ItemCatalog(features=_catalog().features)
    return MixLLMRanker(model, processor, catalog, mode="student", template=template, max_history=H, **kwargs).eval()


def _separate_scores(ranker: MixLLMRanker, request: RankingRequest) -> torch.Tensor:
    """Reference: one ordinary causal forward of prefix + candidate per candidate, no block mask."""
    out = []
    for c in request.candidates:
        p = ranker.build_prompt(RankingRequest(request.history, [c]))
        embeds = ranker.model.embed_inputs(torch.tensor([p.input_ids]), item_features=p.item_features,
                                           user_history=p.user_history[None])  # fmt: skip
        hidden = ranker.model.language_model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        out.append(ranker.score_head(hidden[0, -1])[0])
    return torch.stack(out)


LONG = list(range(10, 10 + U))  # U history items, oldest first
REQUEST = RankingRequest(history=LONG, candidates=[1, 2, 3, 2])


# --- placement ----------------------------------------------------------------------------------
@torch.no_grad()
def test_user_tokens_sit_after_the_instruction_and_before_the_first_history_item():
    ranker = _ranker()
    user_id, item_id = ranker.model.config.token_ids["user"], ranker.model.config.token_ids["item"]
    prompt = ranker.build_prompt(REQUEST)
    vocab = ranker.processor.tokenizer.get_vocab()
    words = [vocab[w] for w in "the user watched this user".split()]
    # prefix = "the user watched" + " this user<user>" + H x <item> + " rank"
    assert prompt.prefix_ids == words + [user_id] * M + [item_id] * H + [vocab["rank"]]
    assert prompt.input_ids.count(user_id) == M  # m per request, none in the candidate segments
    # The item tokens are the last H items; the user encoder reads the last U, from user_features.
    catalog = ranker.catalog
    assert torch.equal(prompt.item_features, catalog.features[LONG[-H:] + [1, 2, 3, 2]])
    assert torch.equal(prompt.user_history, catalog.user_features[LONG[-U:]])
    inputs = ranker.prepare([REQUEST])
    embeds = ranker.model.embed_inputs(inputs.input_ids, item_features=inputs.item_features,
                                       user_history=inputs.user_history, user_history_mask=inputs.user_history_mask)  # fmt: skip
    expected = ranker.model.get_user_features(catalog.user_features[LONG][None])[0]  # (M, D)
    assert torch.allclose(embeds[0, len(words) : len(words) + M], expected, atol=1e-6)
    ranker.max_history = U + 2  # more item tokens than the user window: the user encoder reads the last U
    longer = ranker.build_prompt(RankingRequest(history=[0, 1] + LONG, candidates=[2]))
    assert longer.prefix_ids.count(item_id) == U + 2 and ranker.max_request_history == U + 2
    assert torch.equal(longer.user_history, catalog.user_features[LONG])


def test_default_template_writes_the_user_part_only_with_a_user_modality():
    template = RankingTemplate()
    old_prefix = "A user's history, oldest first:{history}\nNext item:"  # the prompt before user tokens existed
    assert template.render(["<item>", "<item>"], ["<item>"]) == (old_prefix.replace("{history}", "<item><item>"), ["<item>"])
    prefix, _ = template.render(["<item>"], ["<item>"], user="<user>")
    assert prefix == "A user's history, oldest first:User profile:<user>\n<item>\nNext item:"
    # A model without the user modality gets exactly the old prompt; an empty history gets no user tokens.
    plain, student = _ranker(user=False, template=template), _ranker(template=template)
    request = RankingRequest(history=[4, 5], candidates=[6])
    tokenizer = plain.processor.tokenizer
    old = tokenizer(old_prefix.replace("{history}", "<item><item>"), add_special_tokens=False)["input_ids"]
    assert plain.build_prompt(request).prefix_ids == old
    user_id = student.model.config.token_ids["user"]
    assert student.build_prompt(request).prefix_ids.count(user_id) == M
    empty = student.build_prompt(RankingRequest(history=[], candidates=[6]))
    assert user_id not in empty.input_ids and empty.user_history is None


# --- counts and errors --------------------------------------------------------------------------
def test_count_mismatches_and_wrong_tables_raise_errors_naming_them():
    ranker = _ranker()
    with pytest.raises(DataError, match=r"user: the text has 2 <user> placeholder\(s\) but 1 input\(s\) were given"):
        ranker.processor("the <user> <user> rank", user_history=[torch.randn(2, F_USER)])
    # A <user> placeholder in the candidate text: one history for 1 + C placeholders.
    stray = _ranker(template=RankingTemplate(prefix="the{history} rank", segment="{item} <user>", user=" user{user}"))
    with pytest.raises(DataError, match=r"request 0: user: the text has 3 <user> placeholder\(s\) but 1 input\(s\)"):
        stray.score([RankingRequest([1, 2], [3, 4])])
    # Placeholders without user features reach the merge's count check.
    inputs = ranker.prepare([REQUEST])
    inputs.user_history = inputs.user_history_mask = None
    with pytest.raises(ValueError, match=f"user: {M} placeholder tokens .* but 0 feature vectors"):
        ranker(inputs)
    plain = _ranker(user=False)
    with pytest.raises(DataError, match=r"ItemCatalog.user_features \(6 wide\) were given but the model has no user modality"):
        MixLLMRanker(plain.model, plain.processor, _catalog())
    with pytest.raises(DataError, match="user_history: this model has no user modality"):
        plain.prompts.student(candidate_features=torch.randn(1, F), user_history=torch.randn(2, F_USER))
    narrow = ItemCatalog(features=torch.randn(N_ITEMS, F), user_features=torch.randn(N_ITEMS, 5))
    with pytest.raises(DataError, match=r"ItemCatalog.user_features have width 5 but the user encoder expects 6"):
        MixLLMRanker(ranker.model, ranker.processor, narrow)
    with pytest.raises(DataError, match=r"ItemCatalog.features \(read as user_features\) have width 8 but the user encoder "
                                        r"expects 6 \(UserConfig.item_dim\)"):
        MixLLMRanker(ranker.model, ranker.processor, ItemCatalog(features=torch.randn(N_ITEMS, F)))
    with pytest.raises(DataError, match="ItemCatalog has 30 items but 29 user_features rows"):
        ItemCatalog(features=torch.randn(N_ITEMS, F), user_features=torch.randn(N_ITEMS - 1, F_USER))
    with pytest.raises(DataError, match=r"request 0: the history has 9 items but this ranker reads at most 8 "
                                        r"\(max_history 3 as item tokens, user.max_history 8 for the user encoder\)"):
        ranker.score([RankingRequest(list(range(U + 1)), [0])])
    with pytest.raises(DataError, match="request 0 history: item id 30 is not in the catalog"):
        ranker.score([RankingRequest([30] + LONG[1:], [0])])  # outside the item tokens, inside the user window


# --- batching -----------------------------------------------------------------------------------
@torch.no_grad()
def test_one_batched_forward_equals_each_request_alone_and_plain_causal_forwards():
    ranker = _ranker()
    requests = [
        REQUEST,                                                      # U history items, 4 candidates
        RankingRequest(history=[7, 8], candidates=[9, 10, 11]),       # shorter than H
        RankingRequest(history=[], candidates=[12, 13]),              # no history: no user tokens
        RankingRequest(history=[14, 15, 16, 17, 18], candidates=[19]),  # between H and U
    ]  # fmt: skip
    inputs = ranker.prepare(requests)
    assert inputs.user_history.shape == (3, U, F_USER)  # one user per request with history, right-padded
    assert inputs.user_history_mask.sum(1).tolist() == [U, 2, 5]
    batched = ranker(inputs)
    for row, r in enumerate(requests):
        (alone,) = ranker.score([r])
        assert torch.allclose(batched[row, : len(r.candidates)], alone, atol=1e-5), row
    # The block mask lets every candidate see the user tokens exactly as a prefix + candidate forward does.
    (together,) = ranker.score([REQUEST])
    assert torch.allclose(together, _separate_scores(ranker, REQUEST), atol=1e-5)
    # Cached item tokens leave the user tokens in place.
    ranker.token_cache = ItemTokenCache.build(ranker.model, features=ranker.catalog.features)
    assert torch.allclose(ranker(ranker.prepare(requests)), batched, atol=1e-5)


# --- the user tokens are used -------------------------------------------------------------------
@torch.no_grad()
def test_history_beyond_the_item_tokens_changes_scores_only_through_user_tokens():
    recent = [1, 2, 3]  # the last H items, the same in both histories
    older_a, older_b = [20, 21, 22, 23, 24], [25, 26, 27, 28, 29]
    candidates = torch.tensor([[4, 5, 6, 7]] * 2)
    history = torch.full((2, 2 * U), PAD)  # the evaluator's padded histories, longer than anyone reads
    history[0, -U:], history[1, -U:] = torch.tensor(older_a + recent), torch.tensor(older_b + recent)
    batch = RankingBatch(users=torch.tensor([0, 1]), history=history, candidates=candidates)

    student = ProtocolRanker(_ranker(), "user")
    assert (student.max_history, student.max_item_history) == (U, H)  # make_batch must supply U items
    assert student.requests(batch)[0].history == older_a + recent
    scores = student.score(batch)
    assert (scores[0] - scores[1]).abs().max() > 1e-3, scores  # only the user tokens differ

    plain = ProtocolRanker(_ranker(user=False), "plain")
    assert (plain.max_history, plain.max_item_history) == (H, H)
    assert torch.equal(plain.score(batch)[0], plain.score(batch)[1])  # the older items are never read


# --- checkpoints --------------------------------------------------------------------------------
def test_save_load_round_trip_keeps_user_features_and_scores(tmp_path, tiny_lm_dir):
    ranker = _ranker(lm_path=tiny_lm_dir)
    with torch.no_grad():
        for p in [*ranker.score_head.parameters(), *ranker.model.projectors.parameters(), *ranker.model.encoders.parameters()]:
            p.add_(0.05)  # trained parts differ from any fresh init
        expected = ranker.score([REQUEST, RankingRequest([4], [5, 6])])
    ranker.save_pretrained(tmp_path / "ckpt")
    stored = load_file(str(tmp_path / "ckpt" / "catalog_features.safetensors"))
    assert torch.equal(stored["user_features"], ranker.catalog.user_features)
    assert torch.equal(stored["features"], ranker.catalog.features)
    torch.manual_seed(123)
    loaded = MixLLMRanker.from_pretrained(tmp_path / "ckpt")  # no catalog: the stored tables serve
    assert loaded.model.config.user == ranker.model.config.user and loaded.max_request_history == U
    assert loaded.prompts.template == TEMPLATE
    with torch.no_grad():
        got = loaded.score([REQUEST, RankingRequest([4], [5, 6])])
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-6)
    # A catalog given without user features gets the stored ones.
    partial = MixLLMRanker.from_pretrained(tmp_path / "ckpt", ItemCatalog(features=ranker.catalog.features))
    assert torch.equal(partial.catalog.user_features, ranker.catalog.user_features)
