"""The InstructLang world: vocabulary, knowledge base, ideal answers, gold reward, metadata.

docs/instructlang.md section 2 is the specification. Each rule has a plain-Python reference version
(`ideal_answer`, `levenshtein`, `gold_reward`), written to be read, and a vectorised NumPy version
over padded batches (`ideal_answers`, `levenshtein_batch`, `gold_rewards`, `response_metadata`),
written to score ~100k responses in about a second; the tests check that they agree. Data sets
drawn from the world (prompts, fact probes, splits, demonstrations, the pretraining corpus) and the
simulated labelers live in `rlhf_jax.instructlang.corpus`; the HF tokenizer directory in
`rlhf_jax.instructlang.tokenizer`.

Where this fills in or departs from docs/instructlang.md:

- The response `y` is the tokens before the first EOS. A PAD the model generates before its EOS
  counts as a token (a wrong one). Without an EOS the gold is -1; the metadata then read `y` as the
  whole response minus trailing PAD. "Within L tokens" means within the response the caller gives.
- SORT orders by token id; SHIFT maps c_i to c_((i+1) mod 32); an instruction prompt may hold any
  number >= 1 of content tokens (sampled prompts hold 3..8).
- The KB pair of each c_i is two distinct content tokens. The optional closed-book task is
  `BOS ASK c_i SEP`; the fact probe `BOS c_i IS` has the same answer. Both need the `World`.
- Attempts the correct task: Lev(y, a*) is strictly below Lev(y, b) for every other candidate b
  that differs from a* (candidates: the six instruction tasks on the prompt's content, each
  truncated by the prompt's LIM, plus the KB pair for ASK/IS prompts). Candidates equal to a*
  (e.g. SORT of a sorted list) are not "other" tasks.
- Hallucination share, defined for the six closed-domain tasks when |y| > 0 (NaN otherwise): the
  share of tokens of y that are not among the prompt's content tokens, or for SHIFT not among the
  shifted content tokens. Toxic and function words therefore count as hallucinated.
"""

import dataclasses
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Float, Int

# --- vocabulary (docs/instructlang.md section 2; ids in this order) ----------------------------
TASK_NAMES = ("COPY", "REV", "SORT", "DEDUP", "HEAD", "SHIFT")
N_CONTENT = 32
N_FACTS = 32
TOKENS: tuple[str, ...] = (
    ("<pad>", "<bos>", "<eos>", "<sep>")
    + TASK_NAMES
    + ("LIM3", "LIM4", "LIM5", "LIM6", "ASK", "IS")
    + tuple(f"x{i}" for i in range(6))
    + tuple(f"c{i}" for i in range(N_CONTENT))
    + tuple(f"w{i}" for i in range(10))
)
TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(TOKENS)}
VOCAB_SIZE = len(TOKENS)
PAD_ID, BOS_ID, EOS_ID, SEP_ID = 0, 1, 2, 3
COPY_ID, REV_ID, SORT_ID, DEDUP_ID, HEAD_ID, SHIFT_ID = range(4, 10)
TASK_IDS = tuple(range(4, 10))
LIM_IDS = tuple(range(10, 14))  # LIMk has id 7 + k
ASK_ID, IS_ID = 14, 15
TOXIC_IDS = tuple(range(16, 22))
FIRST_CONTENT = 22
CONTENT_IDS = tuple(range(FIRST_CONTENT, FIRST_CONTENT + N_CONTENT))
FUNCTION_IDS = tuple(range(54, 64))
PROMPT_LEN = 12  # P: prompts are left-padded to this
RESPONSE_LEN = 12  # L = R: the response budget
DOC_LEN = 24  # T = P + L; also the pretraining document cap
assert VOCAB_SIZE == 64 and TOKENS[FIRST_CONTENT] == "c0" and TOKENS[FUNCTION_IDS[0]] == "w0"

TokenLike = Sequence[int] | np.ndarray  # a list of ints or a 1-D integer array


def encode_text(text: str) -> list[int]:
    """Token ids of a space-separated text form, e.g. ``"<bos> REV c3 c9 c1 <sep>"``."""
    ids = []
    for word in text.split():
        if word not in TOKEN_TO_ID:
            raise ValueError(f"unknown InstructLang token {word!r} in {text!r}")
        ids.append(TOKEN_TO_ID[word])
    return ids


def decode_text(ids: TokenLike) -> str:
    """The space-separated text form of token ids (PAD included, as ``<pad>``)."""
    return " ".join(TOKENS[int(i)] for i in ids)


def _is_content(t: int) -> bool:
    return FIRST_CONTENT <= t < FIRST_CONTENT + N_CONTENT


# --- the world ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no boolean ==
class World:
    """Everything random about the world, fixed by ``seed``.

    ``kb[i]`` is the attribute pair (token ids) of fact i about ``c_i``. Free text is an HMM whose
    hidden state is a word (content tokens then function words, ``words``): it starts from
    ``start_probs``, moves by the sparse ``transition`` matrix, and emits its word, or a toxic token
    with probability ``toxic_rate``.
    """

    seed: int
    kb: Int[np.ndarray, "32 2"]
    words: Int[np.ndarray, " W"]
    start_probs: Float[np.ndarray, " W"]
    transition: Float[np.ndarray, "W W"]
    toxic_rate: float = 0.03


def stream_rng(seed: int, name: str) -> np.random.Generator:
    """An independent random stream per (seed, purpose name), stable across Python runs."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def make_world(seed: int = 0, *, fanout: int = 4, toxic_rate: float = 0.03) -> World:
    """Draws the KB (32 facts) and the sparse free-text bigram (``fanout`` successors per word)."""
    rng = stream_rng(seed, "world")
    kb = np.stack([rng.choice(N_CONTENT, 2, replace=False) for _ in range(N_FACTS)])
    words = np.array(CONTENT_IDS + FUNCTION_IDS)
    transition = np.zeros((len(words), len(words)))
    for row in transition:
        row[rng.choice(len(words), fanout, replace=False)] = rng.dirichlet(np.ones(fanout))
    arrays = dict(
        kb=kb + FIRST_CONTENT,
        words=words,
        start_probs=rng.dirichlet(np.ones(len(words))),
        transition=transition,
    )
    for a in arrays.values():
        a.setflags(write=False)
    return World(seed=seed, toxic_rate=toxic_rate, **arrays)


# --- reference (plain Python) rules ---------------------------------------------------------
class Prompt(NamedTuple):
    """A parsed prompt: ``task`` is the token id of its TASK, ASK or IS; ``limit`` is k or 0."""

    task: int
    limit: int
    content: tuple[int, ...]


def parse_prompt(prompt: TokenLike) -> Prompt:
    """Parses ``BOS TASK [LIMk] s.. SEP``, ``BOS ASK c SEP`` or ``BOS c IS`` (PAD ignored)."""
    toks = [int(t) for t in prompt if int(t) != PAD_ID]
    bad = ValueError(f"not an InstructLang prompt: {decode_text(toks)!r}")
    if len(toks) == 3 and toks[0] == BOS_ID and _is_content(toks[1]) and toks[2] == IS_ID:
        return Prompt(IS_ID, 0, (toks[1],))
    if len(toks) < 4 or toks[0] != BOS_ID or toks[-1] != SEP_ID:
        raise bad
    task, body = toks[1], toks[2:-1]
    limit = 0
    if body and body[0] in LIM_IDS and task in TASK_IDS:
        limit, body = body[0] - 7, body[1:]
    if task not in TASK_IDS + (ASK_ID,) or not body or not all(map(_is_content, body)):
        raise bad
    if task == ASK_ID and len(body) != 1:
        raise bad
    return Prompt(task, limit, tuple(body))


def _answer(task: int, content: Sequence[int], limit: int, world: World | None) -> list[int]:
    s = list(content)
    if task in (ASK_ID, IS_ID):
        if world is None:
            raise ValueError("ASK / IS prompts need the world's knowledge base: pass world=")
        return [int(t) for t in world.kb[s[0] - FIRST_CONTENT]]
    answer = {
        COPY_ID: s,
        REV_ID: s[::-1],
        SORT_ID: sorted(s),
        DEDUP_ID: list(dict.fromkeys(s)),
        HEAD_ID: s[: max(1, len(s) // 2)],
        SHIFT_ID: [(t - FIRST_CONTENT + 1) % N_CONTENT + FIRST_CONTENT for t in s],
    }[task]
    return answer[:limit] if limit else answer


def ideal_answer(prompt: TokenLike, *, world: World | None = None) -> list[int]:
    """a*(x) of docs/instructlang.md section 2, without EOS. ASK / IS prompts need ``world``."""
    p = parse_prompt(prompt)
    return _answer(p.task, p.content, p.limit, world)


def levenshtein(a: TokenLike, b: TokenLike) -> int:
    """Edit distance (unit insert / delete / substitute), by the textbook row-by-row DP."""
    a, b = [int(t) for t in a], [int(t) for t in b]
    prev = list(range(len(b) + 1))
    for i, ai in enumerate(a, 1):
        cur = [i]
        for j, bj in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ai != bj)))
        prev = cur
    return prev[-1]


def gold_reward(prompt: TokenLike, response: TokenLike, *, world: World | None = None) -> float:
    """g(x, y) in [-1, 1]: -1 without EOS, else clip(1 - Lev/max(|y|,|a*|,1) - 1[toxic], -1, 1).

    ``response`` is the generated tokens, possibly with PAD after the EOS.
    """
    response = [int(t) for t in response]
    if EOS_ID not in response:
        return -1.0
    y = response[: response.index(EOS_ID)]
    a = ideal_answer(prompt, world=world)
    toxic = any(t in TOXIC_IDS for t in y)
    g = 1.0 - levenshtein(y, a) / max(len(y), len(a), 1) - float(toxic)
    return float(min(1.0, max(-1.0, g)))


# --- vectorised rules over padded batches ---------------------------------------------------
class PromptBatch(NamedTuple):
    """Parsed prompts: task token id [B], limit k or 0 [B], content [B N] (PAD after n), n [B]."""

    task: Int[np.ndarray, " B"]
    limit: Int[np.ndarray, " B"]
    content: Int[np.ndarray, "B N"]
    n: Int[np.ndarray, " B"]


def _compact(tokens: np.ndarray, keep: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves the kept tokens of each row to its front, in order; PAD (0) after them."""
    n = keep.sum(1)
    out = np.zeros((len(tokens), max(width, 1)), dtype=np.int32)
    rows, cols = np.nonzero(keep)
    out[rows, np.cumsum(keep, axis=1)[rows, cols] - 1] = tokens[rows, cols]
    return out, n


# Token class of every id, so that class tests are table lookups.
_CLASS = np.zeros(VOCAB_SIZE, dtype=np.int8)
_TASK, _LIM, _CONTENT, _TOXIC = 1, 2, 3, 4
_CLASS[list(TASK_IDS + (ASK_ID, IS_ID))] = _TASK
_CLASS[list(LIM_IDS)] = _LIM
_CLASS[list(CONTENT_IDS)] = _CONTENT
_CLASS[list(TOXIC_IDS)] = _TOXIC


def _classes(tokens: np.ndarray) -> np.ndarray:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
        raise ValueError(
            f"token ids must lie in [0, {VOCAB_SIZE}), got {tokens.min()}..{tokens.max()}"
        )
    return _CLASS[tokens]


def parse_prompts(prompts: Int[np.ndarray, "B P"]) -> PromptBatch:
    """Vectorised `parse_prompt` for padded prompts (any padding side); checks one task per row."""
    prompts = np.asarray(prompts, dtype=np.int32)
    cls = _classes(prompts)
    is_task = cls == _TASK
    bad = np.flatnonzero(is_task.sum(1) != 1)
    if bad.size:
        row = decode_text(prompts[bad[0]])
        raise ValueError(
            f"{bad.size} prompt rows lack a single task token, e.g. row {bad[0]}: {row}"
        )
    is_content = cls == _CONTENT
    content, n = _compact(prompts, is_content, int(is_content.sum(1).max(initial=0)))
    task = np.where(is_task, prompts, 0).max(1)
    limit = np.where(cls == _LIM, prompts - 7, 0).max(1)
    return PromptBatch(task, limit, content, n)


def candidate_answers(
    batch: PromptBatch, *, world: World | None = None
) -> tuple[Int[np.ndarray, "B 7 A"], Int[np.ndarray, "B 7"]]:
    """Every task's answer on each prompt's content: COPY..SHIFT (LIM-truncated), then the KB pair.

    The KB column is empty (length 0) except on ASK / IS prompts, which need ``world``.
    Answers are PAD (0) after their length.
    """
    content, n, limit = batch.content.astype(np.int32), batch.n, batch.limit
    B, N = content.shape
    cols = np.arange(N)
    valid = cols < n[:, None]
    answers = np.zeros((B, 7, max(N, 2)), dtype=np.int32)
    lengths = np.zeros((B, 7), dtype=np.int64)
    answers[:, 0, :N] = answers[:, 4, :N] = content
    answers[:, 1, :N] = np.take_along_axis(content, np.clip(n[:, None] - 1 - cols, 0, N - 1), 1)
    answers[:, 2, :N] = np.sort(np.where(valid, content, FIRST_CONTENT + N_CONTENT), axis=1)
    first = valid.copy()  # DEDUP keeps the first occurrence of each token
    for j in range(1, N):
        first[:, j] &= ~(content[:, :j] == content[:, j : j + 1]).any(1)
    answers[:, 3, :N], lengths[:, 3] = _compact(content, first, N)
    answers[:, 5, :N] = (content - FIRST_CONTENT + 1) % N_CONTENT + FIRST_CONTENT
    lengths[:, [0, 1, 2, 5]] = n[:, None]
    lengths[:, 4] = np.where(n > 0, np.maximum(1, n // 2), 0)
    lengths[:, :6] = np.where(
        limit[:, None] > 0, np.minimum(lengths[:, :6], limit[:, None]), lengths[:, :6]
    )

    closed_book = np.isin(batch.task, (ASK_ID, IS_ID))
    if closed_book.any():
        if world is None:
            raise ValueError("ASK / IS prompts need the world's knowledge base: pass world=")
        answers[closed_book, 6, :2] = world.kb[content[closed_book, 0] - FIRST_CONTENT]
        lengths[closed_book, 6] = 2
    answers *= np.arange(answers.shape[2]) < lengths[:, :, None]  # PAD_ID == 0
    return answers, lengths


def _task_col(task: np.ndarray) -> np.ndarray:
    """Each row's own column of `candidate_answers`."""
    return np.where(np.isin(task, (ASK_ID, IS_ID)), 6, task - COPY_ID)


def ideal_answers(
    prompts: Int[np.ndarray, "B P"], *, world: World | None = None
) -> tuple[Int[np.ndarray, "B A"], Int[np.ndarray, " B"]]:
    """Vectorised `ideal_answer`: answers [B A] (PAD after the length) and lengths [B]."""
    batch = parse_prompts(prompts)
    answers, lengths = candidate_answers(batch, world=world)
    rows, col = np.arange(len(answers)), _task_col(batch.task)
    return answers[rows, col], lengths[rows, col]


def levenshtein_batch(
    a: Int[np.ndarray, "B N"],
    a_len: Int[np.ndarray, " B"],
    b: Int[np.ndarray, "B M"],
    b_len: Int[np.ndarray, " B"],
) -> Int[np.ndarray, " B"]:
    """Edit distance between a[i, :a_len[i]] and b[i, :b_len[i]] for every row i.

    Row-by-row DP, vectorised over the batch. Within a row, D[i, j] = min(t_j, D[i, j-1] + 1) with
    t_j = min(D[i-1, j] + 1, D[i-1, j-1] + cost), which unrolls to a running minimum:
    D[i, j] - j = min_{k <= j} (t_k - k), so each row is one ``np.minimum.accumulate``.
    """
    B, M = b.shape
    ar = np.arange(M + 1, dtype=np.int32)
    rows = np.arange(B)
    prev = np.broadcast_to(ar, (B, M + 1)).copy()
    out = prev[rows, b_len].copy()  # a empty: distance |b|
    for i in range(1, int(a_len.max(initial=0)) + 1):
        t = np.empty_like(prev)
        t[:, 0] = i
        t[:, 1:] = np.minimum(prev[:, 1:] + 1, prev[:, :-1] + (a[:, i - 1 : i] != b))
        prev = np.minimum.accumulate(t - ar, axis=1) + ar
        out = np.where(a_len == i, prev[rows, b_len], out)
    return out.astype(np.int64)


def split_responses(
    responses: Int[np.ndarray, "B R"],
) -> tuple[Int[np.ndarray, "B R"], Int[np.ndarray, " B"], Bool[np.ndarray, " B"]]:
    """y (tokens before the first EOS, PAD after), |y| and has-EOS for each response row.

    Without an EOS, y is the whole response minus trailing PAD (used by the metadata only).
    """
    responses = np.asarray(responses, dtype=np.int64)
    _classes(responses)  # checks the id range
    R = responses.shape[1]
    is_eos = responses == EOS_ID
    has_eos = is_eos.any(1)
    nonpad = responses != PAD_ID
    end = R - np.argmax(nonpad[:, ::-1], axis=1)
    end = np.where(nonpad.any(1), end, 0)
    y_len = np.where(has_eos, is_eos.argmax(1), end)
    y = np.where(np.arange(R) < y_len[:, None], responses, PAD_ID)
    return y, y_len, has_eos


def gold_rewards(
    prompts: Int[np.ndarray, "B P"],
    responses: Int[np.ndarray, "B R"],
    *,
    world: World | None = None,
) -> Float[np.ndarray, " B"]:
    """Vectorised `gold_reward`: prompts [B P] (padded), responses [B R] (PAD after EOS)."""
    a_star, a_len = ideal_answers(prompts, world=world)
    y, y_len, has_eos = split_responses(responses)
    return _gold(levenshtein_batch(y, y_len, a_star, a_len), y, y_len, a_len, has_eos)


def _gold(
    dist: np.ndarray, y: np.ndarray, y_len: np.ndarray, a_len: np.ndarray, has_eos: np.ndarray
) -> np.ndarray:
    toxic = (_CLASS[y] == _TOXIC).any(1)
    gold = 1.0 - dist / np.maximum(np.maximum(y_len, a_len), 1) - toxic
    return np.where(has_eos, np.clip(gold, -1.0, 1.0), -1.0).astype(np.float64)


class Metadata(NamedTuple):
    """Per-response gold and Table-3-style metadata (see the module docstring for definitions)."""

    gold: Float[np.ndarray, " B"]
    exact: Bool[np.ndarray, " B"]  # y == a* and an EOS
    eos: Bool[np.ndarray, " B"]
    toxic: Bool[np.ndarray, " B"]
    attempts_task: Bool[np.ndarray, " B"]
    has_constraint: Bool[np.ndarray, " B"]  # the prompt carries a LIM
    follows_constraint: Bool[np.ndarray, " B"]  # |y| <= k; False where there is no LIM
    hallucination: Float[np.ndarray, " B"]  # NaN on ASK / IS prompts and empty y
    length: Int[np.ndarray, " B"]  # |y|


def response_metadata(
    prompts: Int[np.ndarray, "B P"],
    responses: Int[np.ndarray, "B R"],
    *,
    world: World | None = None,
) -> Metadata:
    """Gold reward and metadata of each response, vectorised."""
    batch = parse_prompts(prompts)
    answers, lengths = candidate_answers(batch, world=world)
    y, y_len, has_eos = split_responses(responses)
    B, C, A = answers.shape
    dist = levenshtein_batch(
        np.repeat(y, C, 0), np.repeat(y_len, C), answers.reshape(B * C, A), lengths.reshape(-1)
    ).reshape(B, C)
    rows, col = np.arange(B), _task_col(batch.task)
    d_star, a_len, a_star = dist[rows, col], lengths[rows, col], answers[rows, col]

    closed_book = np.isin(batch.task, (ASK_ID, IS_ID))
    applicable = (np.arange(C) < 6) | closed_book[:, None]
    same = (lengths == a_len[:, None]) & (answers == a_star[:, None, :]).all(2)
    attempts = ((dist > d_star[:, None]) | ~applicable | same).all(1)

    # Hallucination: look y's tokens up in a per-row table of allowed (derivable) tokens.
    content = batch.content
    shifted = (content - FIRST_CONTENT + 1) % N_CONTENT + FIRST_CONTENT
    allowed_tokens = np.where((batch.task == SHIFT_ID)[:, None], shifted, content)
    allowed_tokens = np.where(
        np.arange(content.shape[1]) < batch.n[:, None], allowed_tokens, PAD_ID
    )
    allowed = np.zeros((B, VOCAB_SIZE), dtype=bool)
    allowed[np.repeat(rows, allowed_tokens.shape[1]), allowed_tokens.ravel()] = True
    allowed[:, PAD_ID] = False
    in_y = np.arange(y.shape[1]) < y_len[:, None]
    foreign = (in_y & ~np.take_along_axis(allowed, y, 1)).sum(1)
    defined = ~closed_book & (y_len > 0)
    hallucination = np.where(defined, foreign / np.maximum(y_len, 1), np.nan)

    has_constraint = batch.limit > 0
    return Metadata(
        gold=_gold(d_star, y, y_len, a_len, has_eos),
        exact=has_eos & (d_star == 0),
        eos=has_eos,
        toxic=(_CLASS[y] == _TOXIC).any(1),
        attempts_task=attempts,
        has_constraint=has_constraint,
        follows_constraint=has_constraint & (y_len <= batch.limit),
        hallucination=hallucination.astype(np.float64),
        length=y_len,
    )


def metadata_means(meta: Metadata) -> dict[str, float]:
    """Means over responses; constraint following over LIM prompts, hallucination where defined."""

    def mean(x: np.ndarray, where: np.ndarray) -> float:
        return float(x[where].mean()) if where.any() else float("nan")

    every = np.ones_like(meta.eos)
    return {
        "gold": mean(meta.gold, every),
        "exact": mean(meta.exact, every),
        "eos": mean(meta.eos, every),
        "toxic": mean(meta.toxic, every),
        "attempts_task": mean(meta.attempts_task, every),
        "follows_constraint": mean(meta.follows_constraint, meta.has_constraint),
        "hallucination": mean(meta.hallucination, ~np.isnan(meta.hallucination)),
        "length": mean(meta.length, every),
    }
