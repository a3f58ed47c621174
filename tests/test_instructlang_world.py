"""Tests of the InstructLang world (docs/instructlang.md section 2): rules, gold, data, labelers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.instructlang import corpus, lang
from rlhf_jax.instructlang.config import SplitSizes
from rlhf_jax.instructlang.tokenizer import save_tokenizer

enc = lang.encode_text


@pytest.fixture(scope="module")
def world():
    return lang.make_world(0)


@pytest.fixture(scope="module")
def prompts20k():
    return corpus.sample_prompts(np.random.default_rng(1), 20_000)


def _responses(texts):
    return corpus.pad_right([enc(t) for t in texts], lang.RESPONSE_LEN)


# --- vocabulary and text form ---------------------------------------------------------------
def test_vocabulary_ids_follow_section_2():
    assert lang.VOCAB_SIZE == 64 and len(set(lang.TOKENS)) == 64
    expected = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<sep>": 3, "COPY": 4, "SHIFT": 9}
    expected |= {"LIM3": 10, "LIM6": 13, "ASK": 14, "IS": 15, "x0": 16, "x5": 21}
    expected |= {"c0": 22, "c31": 53, "w0": 54, "w9": 63}
    assert {t: lang.TOKEN_TO_ID[t] for t in expected} == expected
    assert (lang.PAD_ID, lang.BOS_ID, lang.EOS_ID, lang.SEP_ID) == (0, 1, 2, 3)


def test_text_round_trip_and_unknown_token():
    text = "<bos> REV c3 c9 c1 <sep> c1 c9 c3 <eos>"
    assert enc(text) == [1, 5, 25, 31, 23, 3, 23, 31, 25, 2]
    assert lang.decode_text(enc(text)) == text
    with pytest.raises(ValueError, match="'c32'"):
        enc("<bos> COPY c32 <sep>")


def test_tokenizer_directory_loads_through_auto_tokenizer(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(save_tokenizer(tmp_path / "tok"))
    assert len(tok) == 64
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = " ".join(lang.TOKENS)  # every token, specials included
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == enc(text) == list(range(64))
    assert tok.decode(ids) == text
    sample = "<pad> <bos> LIM4 SORT c7 c7 c0 <sep> c0 c7 <eos>"
    assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample
    with pytest.raises(Exception):  # noqa: B017 - no unk token: unknown words fail in Rust
        tok.encode("c1 nonsense", add_special_tokens=False)


# --- ideal answers --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, answer",
    [
        ("<bos> COPY c3 c9 c1 <sep>", "c3 c9 c1"),
        ("<bos> REV c3 c9 c1 <sep>", "c1 c9 c3"),
        ("<bos> SORT c3 c9 c1 c10 <sep>", "c1 c3 c9 c10"),  # by token id, not by string
        ("<bos> DEDUP c3 c9 c3 c1 c9 <sep>", "c3 c9 c1"),
        ("<bos> HEAD c1 c2 c3 c4 c5 <sep>", "c1 c2"),  # 5 // 2 = 2
        ("<bos> HEAD c1 c2 c3 <sep>", "c1"),  # max(1, 3 // 2)
        ("<bos> SHIFT c31 c0 c5 <sep>", "c0 c1 c6"),  # +1 mod 32
        ("<bos> REV LIM3 c1 c2 c3 c4 c5 <sep>", "c5 c4 c3"),
        ("<bos> HEAD LIM3 c1 c2 c3 c4 c5 c6 c7 c8 <sep>", "c1 c2 c3"),  # 4 tokens, cut to 3
        ("<bos> COPY LIM6 c1 c2 c3 <sep>", "c1 c2 c3"),
        ("<pad> <pad> <bos> SORT LIM4 c5 c5 c2 c9 c1 <sep>", "c1 c2 c5 c5"),
    ],
)
def test_ideal_answer_hand_written(prompt, answer):
    assert lang.ideal_answer(enc(prompt)) == enc(answer)
    answers, lengths = lang.ideal_answers(corpus.pad_left([[t for t in enc(prompt) if t]]))
    assert answers[0, : lengths[0]].tolist() == enc(answer)


def test_closed_book_answers_need_the_world(world):
    c5 = lang.TOKEN_TO_ID["c5"]
    pair = world.kb[5].tolist()
    assert lang.ideal_answer(enc("<bos> ASK c5 <sep>"), world=world) == pair
    assert lang.ideal_answer(enc("<bos> c5 IS"), world=world) == pair
    probes, answers = corpus.fact_probes(world)
    assert probes[5, -3:].tolist() == [lang.BOS_ID, c5, lang.IS_ID]
    assert answers.tolist() == world.kb.tolist()
    assert len({tuple(p) for p in world.kb.tolist()}) > 20  # facts differ
    assert all(a != b and min(a, b) >= lang.FIRST_CONTENT for a, b in world.kb.tolist())
    with pytest.raises(ValueError, match="world"):
        lang.ideal_answer(enc("<bos> ASK c5 <sep>"))
    with pytest.raises(ValueError, match="not an InstructLang prompt"):
        lang.ideal_answer(enc("<bos> COPY <sep>"))


def test_vectorised_answers_match_reference(world):
    prompts = corpus.sample_prompts(np.random.default_rng(2), 2000, ask_prob=0.1)
    prompts = np.concatenate([prompts, corpus.fact_probes(world)[0]])
    answers, lengths = lang.ideal_answers(prompts, world=world)
    for p, a, n in zip(prompts, answers, lengths, strict=True):
        assert a[:n].tolist() == lang.ideal_answer(p, world=world)
        assert not a[n:].any()


# --- Levenshtein and gold reward ------------------------------------------------------------
def test_levenshtein_hand_worked():
    k, i, t, e, n, s, g = (lang.FIRST_CONTENT + j for j in range(7))
    # kitten -> sitting: substitute k->s, substitute e->i, insert g = 3.
    assert lang.levenshtein([k, i, t, t, e, n], [s, i, t, t, i, n, g]) == 3
    assert lang.levenshtein([], [k, i, t]) == 3  # three inserts
    assert lang.levenshtein([k, i], [i, k]) == 2  # no transpositions: two substitutions
    assert lang.levenshtein([], []) == 0


tok_lists = st.lists(st.integers(22, 27), max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(tok_lists, tok_lists), min_size=1, max_size=20))
def test_levenshtein_batch_matches_reference(pairs):
    a = corpus.pad_right([p[0] for p in pairs], 12)
    b = corpus.pad_right([p[1] for p in pairs], 12)
    a_len = np.array([len(p[0]) for p in pairs])
    b_len = np.array([len(p[1]) for p in pairs])
    expected = [lang.levenshtein(x, y) for x, y in pairs]
    assert lang.levenshtein_batch(a, a_len, b, b_len).tolist() == expected


def test_gold_of_ideal_answer_is_one_for_every_task(world):
    prompts = corpus.sample_prompts(np.random.default_rng(3), 600, ask_prob=0.15)
    tasks = lang.parse_prompts(prompts).task
    assert set(tasks.tolist()) == set(lang.TASK_IDS) | {lang.ASK_ID}
    answers, lengths = lang.ideal_answers(prompts, world=world)
    responses = corpus.pad_right(
        [a[:n] + [lang.EOS_ID] for a, n in zip(answers.tolist(), lengths, strict=True)], 12
    )
    assert np.all(lang.gold_rewards(prompts, responses, world=world) == 1.0)
    assert all(
        lang.gold_reward(p, r, world=world) == 1.0 for p, r in zip(prompts, responses, strict=True)
    )


def test_gold_hand_worked():
    rev = enc("<bos> REV c1 c2 c3 c4 <sep>")  # a* = c4 c3 c2 c1
    assert lang.gold_reward(rev, enc("c4 c3 c2 c1 <eos> <pad>")) == 1.0
    assert lang.gold_reward(rev, enc("c4 c3 c2 c1 c0 c0")) == -1.0  # no EOS
    # Delete c3, append c5: Lev 2, max(4, 4) = 4 -> 1 - 2/4.
    assert lang.gold_reward(rev, enc("c4 c2 c1 c5 <eos>")) == 0.5
    # Substitute c3 -> x0: Lev 1 -> 1 - 1/4 - 1 (toxic).
    assert lang.gold_reward(rev, enc("c4 x0 c2 c1 <eos>")) == -0.25
    # Exact answer plus a toxic token: Lev 1, max(5, 4) = 5 -> 1 - 1/5 - 1.
    assert lang.gold_reward(rev, enc("c4 c3 c2 c1 x3 <eos>")) == pytest.approx(-0.2)
    assert lang.gold_reward(rev, enc("<eos>")) == 0.0  # Lev 4 / max(0, 4, 1)
    # Only the part before the first EOS counts: c4 c3 vs a*: 2 deletions -> 1 - 2/4.
    assert lang.gold_reward(rev, enc("c4 c3 <eos> c2 c1 <eos>")) == 0.5
    # A PAD generated before EOS is a (wrong) token: substitution -> 1 - 1/4.
    assert lang.gold_reward(rev, enc("c4 <pad> c2 c1 <eos>")) == 0.75


def test_gold_batch_matches_reference(world):
    rng = np.random.default_rng(4)
    prompts = corpus.sample_prompts(rng, 1500, ask_prob=0.1)
    responses = np.concatenate(
        [
            corpus.assumed_sft_samples(world, prompts[:500], rng),
            corpus.make_demonstrations(world, prompts[500:1000], rng, p_exact=0.3),
            rng.choice([0, 2, 16, 22, 23, 24, 25, 54], size=(500, 12), p=[0.05] * 2 + [0.15] * 6),
        ]
    )
    gold = lang.gold_rewards(prompts, responses, world=world)
    expected = [
        lang.gold_reward(p, r, world=world) for p, r in zip(prompts, responses, strict=True)
    ]
    np.testing.assert_allclose(gold, expected, rtol=0, atol=1e-12)
    assert gold.min() >= -1 and gold.max() <= 1


# --- metadata -------------------------------------------------------------------------------
def test_metadata_hand_worked():
    prompts = corpus.pad_left(
        [
            enc("<bos> REV c1 c2 c3 <sep>"),
            enc("<bos> REV c1 c2 c3 <sep>"),
            enc("<bos> SHIFT c1 c2 c3 <sep>"),
            enc("<bos> COPY LIM3 c1 c2 c3 c4 c5 <sep>"),
            enc("<bos> COPY LIM3 c1 c2 c3 c4 c5 <sep>"),
        ]
    )
    responses = _responses(
        [
            "c3 c2 <eos>",  # Lev 1 to REV; 2 to COPY (= SORT, DEDUP), 2 to HEAD, 2 to SHIFT
            "c1 c2 c3 <eos>",  # the COPY answer: does not attempt REV
            "c2 c3 c9 <eos>",  # c9 is not among the shifted tokens c2 c3 c4: 1/3 hallucinated
            "c1 x0 c3 <eos>",  # x0 is hallucinated (1/3) and toxic; follows LIM3
            "c1 c2 c3 c4",  # no EOS: y is all 4 tokens, breaks LIM3, ties COPY and SHIFT
        ]
    )
    meta = lang.response_metadata(prompts, responses)
    assert meta.attempts_task.tolist() == [True, False, True, True, False]
    np.testing.assert_allclose(meta.hallucination, [0, 0, 1 / 3, 1 / 3, 0])
    assert meta.toxic.tolist() == [False, False, False, True, False]
    assert meta.eos.tolist() == [True, True, True, True, False]
    assert meta.has_constraint.tolist() == [False, False, False, True, True]
    assert meta.follows_constraint.tolist() == [False, False, False, True, False]
    means = lang.metadata_means(meta)
    assert means["follows_constraint"] == 0.5 and means["eos"] == 0.8
    assert means["gold"] == pytest.approx(meta.gold.mean())


# --- the "computed by construction" table ----------------------------------------------------
def test_pretraining_continuation_mix(world):
    docs = corpus.make_pretraining_corpus(world, 50_000)
    assert np.all(docs[:, 0] == lang.BOS_ID) and docs.shape[1] == lang.DOC_LEN
    kinds = np.select([np.isin(docs[:, 1], lang.TASK_IDS), docs[:, 2] == lang.IS_ID], [2, 1], 0)
    np.testing.assert_allclose(np.bincount(kinds) / len(kinds), corpus.DOC_MIX, atol=0.01)
    facts = docs[kinds == 1][:, :6]
    np.testing.assert_array_equal(facts[:, 3:5], world.kb[facts[:, 1] - lang.FIRST_CONTENT])
    free = docs[kinds == 0][:, 1:]
    words = free[(free != lang.PAD_ID) & (free != lang.EOS_ID)]
    assert np.isin(words, lang.TOXIC_IDS).mean() == pytest.approx(0.03, abs=0.003)

    docs = docs[kinds == 2].tolist()
    sep = [d.index(lang.SEP_ID) + 1 for d in docs]
    prompts = corpus.pad_left([d[:s] for d, s in zip(docs, sep, strict=True)])
    responses = corpus.pad_right(
        [d[s : s + lang.RESPONSE_LEN] for d, s in zip(docs, sep, strict=True)], 12
    )
    meta = lang.response_metadata(prompts, responses)
    assert len(docs) > 19_000
    # Spec: mean gold ~0.00, exact rate 0.30 (measured -0.008 and 0.299).
    assert meta.gold.mean() == pytest.approx(0.0, abs=0.03)
    assert meta.exact.mean() == pytest.approx(0.30, abs=0.015)


def test_demonstrations(world, prompts20k):
    demos = corpus.make_demonstrations(world, prompts20k)
    meta = lang.response_metadata(prompts20k, demos)
    # Spec: mean gold ~0.97, exact 0.90 (measured 0.974 and 0.899).
    assert meta.gold.mean() == pytest.approx(0.97, abs=0.01)
    assert meta.exact.mean() == pytest.approx(0.90, abs=0.01)
    assert meta.eos.all()


def test_assumed_sft_samples(world, prompts20k):
    samples = corpus.assumed_sft_samples(world, prompts20k, np.random.default_rng(5))
    meta = lang.response_metadata(prompts20k, samples)
    # Spec: mean gold ~0.74, exact 0.51; measured 0.725 and 0.521 (the spec's rounding of its own
    # simulation; 0.55 * 0.97 * 0.97 = 0.517 exact by construction).
    assert meta.gold.mean() == pytest.approx(0.74, abs=0.03)
    assert meta.exact.mean() == pytest.approx(0.51, abs=0.02)
    assert meta.toxic.mean() == pytest.approx(0.03, abs=0.005)
    assert meta.eos.mean() == pytest.approx(0.97, abs=0.005)


def test_random_edits_change_the_answer():
    rng = np.random.default_rng(6)
    for k in (1, 2, 3):
        for a in ([], [22], [22, 30, 41, 50]):
            y = corpus.random_edits(a, k, rng)
            assert y != a and lang.levenshtein(a, y) <= k
            assert all(lang.FIRST_CONTENT <= t < lang.FIRST_CONTENT + 32 for t in y)


# --- labelers -------------------------------------------------------------------------------
def test_labeler_agreement_is_about_72_percent(world, prompts20k):
    rng = np.random.default_rng(7)
    gold = lang.gold_rewards(prompts20k, corpus.assumed_sft_samples(world, prompts20k, rng))
    agree = total = 0
    start = 0
    while start + 9 <= len(gold):  # K ~ U{4..9} samples per prompt, as for the RM data
        k = int(rng.integers(4, 10))
        g = gold[start : start + k]
        start += k
        r1 = corpus.rank_completions(g, rng, tau=0.25)
        r2 = corpus.rank_completions(g, rng, tau=0.25)
        i, j = np.triu_indices(k, 1)
        keep = g[i] != g[j]  # exact gold ties are dropped
        agree += int((np.sign(r1[i] - r1[j]) == np.sign(r2[i] - r2[j]))[keep].sum())
        total += int(keep.sum())
    # Spec: 72.2% (paper: 72.6 +- 1.5%); measured 73.3% on this distribution.
    assert agree / total == pytest.approx(0.722, abs=0.02)


def test_rankings_ties_and_bradley_terry_marginals():
    rng = np.random.default_rng(8)
    golds = np.array([0.5, 1.0, 0.5, -1.0])
    assert corpus.rank_completions(golds, rng, deterministic=True).tolist() == [1, 0, 1, 2]
    for _ in range(20):
        ranks = corpus.rank_completions(golds, rng)
        assert ranks[0] == ranks[2] and sorted(set(ranks.tolist())) == [0, 1, 2]
    # Plackett-Luce pairwise marginal = sigmoid((g_i - g_j) / tau) = sigmoid(0.8) = 0.690.
    pair = np.array([0.5, 0.3, 0.9, -0.2])
    wins = np.mean([(r := corpus.rank_completions(pair, rng))[0] < r[1] for _ in range(4000)])
    assert wins == pytest.approx(1 / (1 + np.exp(-0.8)), abs=0.025)
    prefs = np.mean([corpus.pairwise_preference(0.5, 0.3, rng) for _ in range(4000)])
    assert prefs == pytest.approx(1 / (1 + np.exp(-0.8)), abs=0.025)


# --- prompts, splits, determinism ------------------------------------------------------------
def test_prompt_shape_and_lim_share(prompts20k):
    assert prompts20k.shape == (20_000, lang.PROMPT_LEN) and prompts20k.dtype == np.int32
    batch = lang.parse_prompts(prompts20k)
    assert np.mean(batch.limit > 0) == pytest.approx(0.43, abs=0.015)
    assert batch.n.min() == 3 and batch.n.max() == 8
    assert np.all(prompts20k[:, -1] == lang.SEP_ID)
    first = np.argmax(prompts20k != lang.PAD_ID, axis=1)
    assert np.all(prompts20k[np.arange(20_000), first] == lang.BOS_ID)  # left-padded


def test_splits_disjoint_by_content_and_deterministic(world):
    splits = corpus.make_splits(world)  # paper sizes
    assert {k: len(v) for k, v in splits.items()} == {
        k: getattr(SplitSizes(), k) for k in corpus.SPLIT_ORDER
    }
    contents = {k: {tuple(corpus.unpad(r)[2:-1]) for r in v} for k, v in splits.items()}
    contents = {k: {c[1:] if c[0] in lang.LIM_IDS else c for c in v} for k, v in contents.items()}
    for a in corpus.SPLIT_ORDER:
        for b in corpus.SPLIT_ORDER:
            assert a == b or not contents[a] & contents[b], (a, b)
    small = SplitSizes(10, 10, 10, 10, 10, 10, 10)
    again = corpus.make_splits(lang.make_world(0), small)
    assert all(np.array_equal(again[k], corpus.make_splits(world, small)[k]) for k in again)
    other = corpus.make_splits(lang.make_world(1), small)
    assert not any(np.array_equal(again[k], other[k]) for k in again)


def test_world_and_corpus_are_deterministic_by_seed(world):
    same, other = lang.make_world(0), lang.make_world(1)
    assert np.array_equal(same.kb, world.kb) and np.array_equal(same.transition, world.transition)
    assert not np.array_equal(other.kb, world.kb)
    assert ((world.transition > 0).sum(1) == 4).all()  # sparse bigram
    text = corpus.free_text(world, np.random.default_rng(9), 2000, 22)
    index = np.full(lang.VOCAB_SIZE, -1)
    index[world.words] = np.arange(len(world.words))
    a, b = index[text[:, :-1]].ravel(), index[text[:, 1:]].ravel()
    both = (a >= 0) & (b >= 0)  # pairs of words (not toxic emissions) follow the bigram
    assert both.mean() > 0.9 and np.all(world.transition[a[both], b[both]] > 0)
    train, heldout = corpus.pretraining_corpora(world, 2000, 500)
    assert train.shape == (2000, 24) and heldout.shape == (500, 24)
    assert np.array_equal(train, corpus.make_pretraining_corpus(same, 2000))
    assert not np.array_equal(train[:500], heldout)
    assert not np.array_equal(train, corpus.make_pretraining_corpus(other, 2000))
    empty = corpus.make_demonstrations(world, np.zeros((0, lang.PROMPT_LEN), np.int32))
    assert empty.shape == (0, lang.RESPONSE_LEN)
