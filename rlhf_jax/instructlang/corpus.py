"""InstructLang data: prompts, splits, demonstrations, pretraining corpus, simulated labelers.

Everything is deterministic given the world seed and the sizes: each product draws from its own
named stream (`lang.stream_rng`), so e.g. the corpus size does not move the demonstrations.
Arrays are int32 token ids: prompts left-padded to P = 12, responses (with their EOS) right-padded
to R = 12, pretraining documents right-padded to T = 24. `unpad` gives the token list of a row.

Where this fills in or departs from docs/instructlang.md section 2:

- Prompts: task uniform over the six instruction tasks, n ~ U{3..8}, content tokens i.i.d. uniform
  (repeats allowed, so DEDUP has work), LIM with probability 0.43 and k ~ U{3..6}. ASK prompts
  (share ``ask_prob``, 0 by default) take c_i uniform.
- Splits (sft_train, sft_val, rm_train, rm_val, ppo_train, ppo_val, test) are pairwise disjoint by
  content sequence (the tuple s, whatever the task and LIM); duplicates inside a split are allowed.
  They are drawn in the order of `SPLIT_ORDER`, test first, so the test set depends only on the
  seed and its own size. ASK prompts are exempt: only 32 exist, and they probe pretraining facts.
- An edit inserts a random content token, deletes a token, or substitutes a different content
  token, each with probability 1/3 (insert when y is empty). "1-3 edits": k ~ U{1..3}, redrawn
  if the edits cancel out, so an edited answer is never exactly a*.
- Free text (free-text documents and free-text continuations alike) is m ~ U{4..22} tokens of the
  world's HMM followed by EOS; a document is cut at 24 tokens, losing the EOS if it does not fit.
  This length is what makes the continuation mix's mean gold about 0.00, as the spec states.
- A run-on continuation is further instructions without BOS (``TASK [LIMk] s SEP ...``), cut at
  24 tokens: it never holds an EOS.
- Assumed SFT samples (the spec's calibration distribution): a* with probability 0.55, else a* with
  1-3 edits; then with probability 0.03 one token becomes a toxic token (inserted into an empty y);
  then with probability 0.03 the EOS is dropped and the response runs on with content tokens.
- Labelers: a full ranking is a Plackett-Luce sample with utilities g/tau over the *distinct* gold
  values (exactly tied completions share one rank, so ties are dropped downstream). Its pairwise
  marginals are exactly the Bradley-Terry P(i > j) = sigmoid((g_i - g_j)/tau) of the spec.

Measured on 20k prompts, seed 0 (tests/test_instructlang_world.py), against the spec's table:
continuation mix gold -0.008 / exact 0.299 (spec 0.00 / 0.30); demonstrations 0.974 / 0.899
(0.97 / 0.90); assumed SFT samples 0.725 / 0.521 (0.74 / 0.51); inter-labeler agreement at
tau = 0.25 73.3% (72.2%; tau = 0.26 gives 72.2% on this distribution), Bayes-optimal accuracy
0.81 (0.81).
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from jaxtyping import Float, Int

from rlhf_jax.instructlang import lang
from rlhf_jax.instructlang.config import SplitSizes

LIM_PROB = 0.43
SPLIT_ORDER = ("test", "sft_val", "rm_val", "ppo_val", "sft_train", "rm_train", "ppo_train")
FREE_TEXT_LEN = (4, 22)  # min, max tokens of a free-text segment
DOC_MIX = (0.45, 0.15, 0.40)  # free text, KB facts, instruction format
CONTINUATION_MIX = (0.30, 0.20, 0.30, 0.20)  # a*, edited a*, run-on, free text


# --- padding helpers ------------------------------------------------------------------------
def pad_left(
    rows: Sequence[Sequence[int]], length: int = lang.PROMPT_LEN
) -> Int[np.ndarray, "N L"]:
    """Left-pads token lists with PAD into an int32 array [N length]."""
    out = np.full((len(rows), length), lang.PAD_ID, dtype=np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row {i} has {len(row)} tokens > {length}: {lang.decode_text(row)}")
        if row:
            out[i, length - len(row) :] = row
    return out


def pad_right(rows: Sequence[Sequence[int]], length: int) -> Int[np.ndarray, "N L"]:
    """Right-pads token lists with PAD into an int32 array [N length]."""
    out = np.full((len(rows), length), lang.PAD_ID, dtype=np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row {i} has {len(row)} tokens > {length}: {lang.decode_text(row)}")
        out[i, : len(row)] = row
    return out


def unpad(row: lang.TokenLike) -> list[int]:
    """The tokens of a padded row, PAD removed (prompts, responses and documents alike)."""
    return [int(t) for t in row if int(t) != lang.PAD_ID]


# --- prompts --------------------------------------------------------------------------------
def _prompt_rows(
    rng: np.random.Generator, n: int, *, lim_prob: float, ask_prob: float, bos: bool = True
) -> list[list[int]]:
    lengths = rng.integers(3, 9, n).tolist()
    content = (rng.integers(0, lang.N_CONTENT, (n, 8)) + lang.FIRST_CONTENT).tolist()
    tasks = rng.choice(lang.TASK_IDS, n).tolist()
    lims = np.where(rng.random(n) < lim_prob, rng.choice(lang.LIM_IDS, n), 0).tolist()
    ask = (rng.random(n) < ask_prob).tolist()
    head = [lang.BOS_ID] if bos else []
    rows = []
    for i in range(n):
        if ask[i]:
            rows.append(head + [lang.ASK_ID, content[i][0], lang.SEP_ID])
        else:
            lim = [lims[i]] if lims[i] else []
            rows.append(head + [tasks[i]] + lim + content[i][: lengths[i]] + [lang.SEP_ID])
    return rows


def sample_prompts(
    rng: np.random.Generator, n: int, *, lim_prob: float = LIM_PROB, ask_prob: float = 0.0
) -> Int[np.ndarray, "N P"]:
    """n prompts ``BOS TASK [LIMk] s_1..s_n SEP`` (or ``BOS ASK c_i SEP``), left-padded to P."""
    return pad_left(_prompt_rows(rng, n, lim_prob=lim_prob, ask_prob=ask_prob))


class FactProbes(NamedTuple):
    """Fact-probe ``prompts`` [32 P] and their ``answers`` [32 2] (the KB pairs)."""

    prompts: Int[np.ndarray, "32 P"]
    answers: Int[np.ndarray, "32 2"]


def fact_probes(world: lang.World) -> FactProbes:
    """Fact-probe prompts ``BOS c_i IS`` (left-padded to P = 12) and their answers (KB pairs)."""
    prompts = np.full((lang.N_FACTS, lang.PROMPT_LEN), lang.PAD_ID, dtype=np.int32)
    prompts[:, -3:] = np.stack(
        [
            np.full(lang.N_FACTS, lang.BOS_ID),
            np.array(lang.CONTENT_IDS),
            np.full(lang.N_FACTS, lang.IS_ID),
        ],
        axis=1,
    )
    return FactProbes(prompts, world.kb.astype(np.int32))


def make_splits(
    world: lang.World,
    sizes: SplitSizes | None = None,
    *,
    lim_prob: float = LIM_PROB,
    ask_prob: float = 0.0,
) -> dict[str, Int[np.ndarray, "N P"]]:
    """The prompt splits, pairwise disjoint by content sequence, keyed by `SPLIT_ORDER` names
    (``sizes``: the paper-scale defaults of ``SplitSizes`` when None)."""
    sizes = sizes or SplitSizes()
    used: set[tuple[int, ...]] = set()
    splits = {}
    for name in SPLIT_ORDER:
        size = getattr(sizes, name)
        rng = lang.stream_rng(world.seed, f"split/{name}")
        rows, keys, tries = [], [], 0
        while len(rows) < size:
            tries += 1
            if tries > 1000:
                raise ValueError(f"cannot draw {size} prompts for {name!r} disjoint from the rest")
            for row in _prompt_rows(rng, size - len(rows), lim_prob=lim_prob, ask_prob=ask_prob):
                key = tuple(t for t in row if t >= lang.FIRST_CONTENT)
                if row[1] != lang.ASK_ID and key in used:
                    continue
                rows.append(row)
                keys.append(key)
        used.update(k for k, row in zip(keys, rows, strict=True) if row[1] != lang.ASK_ID)
        splits[name] = pad_left(rows)
    return splits


# --- answers with noise ---------------------------------------------------------------------
def random_edits(answer: Sequence[int], n_edits: int, rng: np.random.Generator) -> list[int]:
    """``answer`` after ``n_edits`` random edits (insert / delete / substitute a content token).

    One edit always changes the answer; several are redrawn until the result differs from it.
    """
    answer = [int(t) for t in answer]
    while True:
        y = list(answer)
        for _ in range(n_edits):
            op = int(rng.integers(3)) if y else 0
            pos = int(rng.integers(len(y) + (op == 0)))
            if op == 0:
                y.insert(pos, lang.FIRST_CONTENT + int(rng.integers(lang.N_CONTENT)))
            elif op == 1:
                del y[pos]
            else:  # a different content token: shift by 1..31 within the content range
                shift = int(rng.integers(1, lang.N_CONTENT))
                y[pos] = lang.FIRST_CONTENT + (y[pos] - lang.FIRST_CONTENT + shift) % lang.N_CONTENT
        if y != answer or n_edits == 0:
            return y


def _answer_lists(world: lang.World, prompts: np.ndarray) -> list[list[int]]:
    answers, lengths = lang.ideal_answers(prompts, world=world)
    return [a[:n] for a, n in zip(answers.tolist(), lengths.tolist(), strict=True)]


def make_demonstrations(
    world: lang.World,
    prompts: Int[np.ndarray, "N P"],
    rng: np.random.Generator | None = None,
    *,
    p_exact: float = 0.9,
) -> Int[np.ndarray, "N R"]:
    """Labeler demonstrations: a* + EOS with probability ``p_exact``, else a* with one edit + EOS.

    ``rng`` defaults to the world's "demonstrations" stream.
    """
    rng = lang.stream_rng(world.seed, "demonstrations") if rng is None else rng
    rows = []
    for a in _answer_lists(world, prompts):
        y = a if rng.random() < p_exact else random_edits(a, 1, rng)
        rows.append(y + [lang.EOS_ID])
    return pad_right(rows, lang.RESPONSE_LEN)


def assumed_sft_samples(
    world: lang.World,
    prompts: Int[np.ndarray, "N P"],
    rng: np.random.Generator,
    *,
    p_exact: float = 0.55,
    p_toxic: float = 0.03,
    p_no_eos: float = 0.03,
) -> Int[np.ndarray, "N R"]:
    """The spec's assumed SFT sample distribution, used to calibrate the labelers' tau."""
    rows = []
    for a in _answer_lists(world, prompts):
        y = a if rng.random() < p_exact else random_edits(a, int(rng.integers(1, 4)), rng)
        if rng.random() < p_toxic:
            toxic = int(rng.choice(lang.TOXIC_IDS))
            if y:
                y[int(rng.integers(len(y)))] = toxic
            else:
                y = [toxic]
        if rng.random() < p_no_eos:
            filler = lang.FIRST_CONTENT + rng.integers(
                lang.N_CONTENT, size=lang.RESPONSE_LEN - len(y)
            )
            rows.append(y + filler.tolist())
        else:
            rows.append(y + [lang.EOS_ID])
    return pad_right(rows, lang.RESPONSE_LEN)


# --- pretraining corpus ---------------------------------------------------------------------
def free_text(world: lang.World, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """n free-text segments [n length] of the world's HMM (words, with toxic emissions)."""
    n_words = len(world.words)
    # Row w of the transition CDF shifted up by w: one sorted array, so a whole batch of next-word
    # draws is a single searchsorted of (state + uniform).
    flat_cdf = (np.cumsum(world.transition, axis=1) + np.arange(n_words)[:, None]).ravel()
    state = np.searchsorted(np.cumsum(world.start_probs), rng.random(n), side="right")
    state = np.minimum(state, n_words - 1)
    states = [state]
    for _ in range(length - 1):
        nxt = np.searchsorted(flat_cdf, state + rng.random(n), side="right") - state * n_words
        state = np.clip(nxt, 0, n_words - 1)
        states.append(state)
    tokens = world.words[np.stack(states, axis=1)]
    toxic = rng.random((n, length)) < world.toxic_rate
    return np.where(toxic, rng.choice(lang.TOXIC_IDS, (n, length)), tokens).astype(np.int32)


def make_pretraining_corpus(
    world: lang.World, n_docs: int, *, split: str = "train", ask_prob: float = 0.0
) -> Int[np.ndarray, "N T"]:
    """``n_docs`` pretraining documents [N 24], each from BOS, right-padded with PAD.

    45% free text, 15% KB facts ``BOS c_i IS a_i1 a_i2 EOS``, 40% an instruction prompt followed
    by a continuation: 30% a* + EOS, 20% a* with 1-3 edits + EOS, 30% run-on instructions with no
    EOS, 20% free text. ``split`` names the random stream ("train", "heldout", ...).
    """
    rng = lang.stream_rng(world.seed, f"pretrain/{split}")
    kind = rng.choice(3, n_docs, p=DOC_MIX)
    text = free_text(world, rng, n_docs, FREE_TEXT_LEN[1]).tolist()
    text_len = rng.integers(FREE_TEXT_LEN[0], FREE_TEXT_LEN[1] + 1, n_docs).tolist()
    fact = rng.integers(lang.N_FACTS, size=n_docs).tolist()
    kb = world.kb.tolist()

    n_inst = int((kind == 2).sum())
    prompts = _prompt_rows(rng, n_inst, lim_prob=LIM_PROB, ask_prob=ask_prob)
    answers = _answer_lists(world, pad_left(prompts))
    cont = rng.choice(4, n_inst, p=CONTINUATION_MIX).tolist()
    n_edits = rng.integers(1, 4, n_inst).tolist()
    # Four run-on instructions of >= 5 tokens cover the >= 12 tokens left after any prompt.
    run_on = iter(_prompt_rows(rng, 4 * cont.count(2), lim_prob=LIM_PROB, ask_prob=0.0, bos=False))

    docs, j = [], 0
    for i, k in enumerate(kind.tolist()):
        free = text[i][: text_len[i]] + [lang.EOS_ID]
        if k == 0:
            doc = [lang.BOS_ID] + free
        elif k == 1:
            doc = [lang.BOS_ID, lang.CONTENT_IDS[fact[i]], lang.IS_ID, *kb[fact[i]], lang.EOS_ID]
        else:
            c = cont[j]
            if c == 0:
                tail = answers[j] + [lang.EOS_ID]
            elif c == 1:
                tail = random_edits(answers[j], n_edits[j], rng) + [lang.EOS_ID]
            elif c == 2:
                tail = [t for _ in range(4) for t in next(run_on)]
            else:
                tail = free
            doc = prompts[j] + tail
            j += 1
        docs.append(doc[: lang.DOC_LEN])
    return pad_right(docs, lang.DOC_LEN)


class Corpora(NamedTuple):
    """The pretraining corpus ``train`` [N T] and the ``heldout`` one [M T] (for NLL)."""

    train: Int[np.ndarray, "N T"]
    heldout: Int[np.ndarray, "M T"]


def pretraining_corpora(
    world: lang.World, n_train: int = 200_000, n_heldout: int = 5_000
) -> Corpora:
    """The training corpus and the held-out one (for NLL), from independent streams."""
    return Corpora(
        make_pretraining_corpus(world, n_train, split="train"),
        make_pretraining_corpus(world, n_heldout, split="heldout"),
    )


# --- simulated labelers ---------------------------------------------------------------------
def pairwise_preference(
    g_i: float, g_j: float, rng: np.random.Generator, tau: float = 0.25
) -> bool:
    """True if a labeler prefers i: Bradley-Terry, P(i > j) = sigmoid((g_i - g_j) / tau).

    Exact ties give a coin flip; the comparison pipeline drops them before asking.
    """
    return bool(rng.random() < 1.0 / (1.0 + np.exp(-(g_i - g_j) / tau)))


def rank_completions(
    golds: Float[np.ndarray, " K"],
    rng: np.random.Generator,
    *,
    tau: float = 0.25,
    deterministic: bool = False,
) -> Int[np.ndarray, " K"]:
    """A simulated labeler's ranking of K completions by their gold rewards: rank 0 = best.

    Plackett-Luce with utilities g/tau, sampled by the Gumbel-max trick (sorting g/tau + Gumbel
    noise gives a PL ranking), over the distinct gold values, so exact ties share a rank.
    ``deterministic``: ranked by gold (Gao et al. 2022 section 2.1).
    """
    values, group = np.unique(np.asarray(golds, dtype=np.float64), return_inverse=True)
    keys = values if deterministic else values / tau + rng.gumbel(size=values.shape)
    group_rank = np.empty(len(values), dtype=np.int64)
    group_rank[np.argsort(-keys, kind="stable")] = np.arange(len(values))
    return group_rank[group.reshape(-1)]
