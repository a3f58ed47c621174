"""Tests for rlhf_jax.data: JSONL import, array_record builders, batch loaders and their state."""

import dataclasses
import itertools
import json
import logging
import os
import re
import tempfile

import grain
import numpy as np
import pytest
import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from rlhf_jax.data import builders, loaders
from rlhf_jax.data.files import load_records
from rlhf_jax.data.records import DataError, Kind

WORDS = [
    "what",
    "is",
    "two",
    "plus",
    "three",
    "five",
    "four",
    "six",
    "it",
    "a",
    "cat",
    "dog",
    "says",
    "hello",
    "world",
    "the",
    "end",
]
PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def tok():
    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    model = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def ids(text):
    return [WORDS.index(w) + 3 for w in text.split()]


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# --- round trips: JSONL -> array_record -> data source -> batches ------------------------------


def test_demonstrations_round_trip(tmp_path, tok):
    rows = [
        {"prompt": "what is two plus three", "response": "five"},
        {"prompt": "a cat says", "response": "hello world"},
        {"prompt": "the", "response": "end </s>"},  # EOS already last: not doubled
    ]
    path = builders.build_dataset(
        "demonstrations",
        "sft",
        tmp_path / "data",
        {"train": write_jsonl(tmp_path / "d.jsonl", rows)},
        tokenizer=tok,
        max_prompt_len=5,
        max_response_len=3,
    )
    assert path == builders.dataset_path("demonstrations", "sft", tmp_path / "data")
    meta = builders.read_metadata(path)
    assert meta["kind"] == "demonstrations" and meta["splits"] == {"train": 3}
    assert (meta["max_prompt_len"], meta["max_response_len"]) == (5, 3)
    source = builders.open_source(path, "train")
    np.testing.assert_array_equal(source[1]["prompt"], ids("a cat says"))
    np.testing.assert_array_equal(source[1]["response"], [*ids("hello world"), EOS])

    loader = loaders.make_loader(
        path, "train", batch_size=3, seed=0, shuffle=False, num_epochs=1, prompt_len=6
    )
    (batch,) = list(loader)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((3, 9), np.int32) for k in ("tokens", "attention_mask", "prompt_mask", "response_mask")
    }
    # Prompt left-padded into the first P=6 slots, response from position P, right-padded.
    np.testing.assert_array_equal(
        batch["tokens"],
        [
            [PAD, *ids("what is two plus three"), *ids("five"), EOS, PAD],
            [PAD, PAD, PAD, *ids("a cat says"), *ids("hello world"), EOS],
            [PAD] * 5 + ids("the") + ids("end") + [EOS, PAD],
        ],
    )
    np.testing.assert_array_equal(
        batch["prompt_mask"],
        [[0, 1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0, 0]],
    )
    np.testing.assert_array_equal(
        batch["response_mask"],
        [[0, 0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 0]],
    )
    np.testing.assert_array_equal(
        batch["attention_mask"], batch["prompt_mask"] + batch["response_mask"]
    )


def test_comparisons_round_trip(tmp_path, tok):
    rows = [
        {"prompt": "a dog says", "responses": ["hello", "it", "the end"], "ranks": [0, 2, 2]},
        {"prompt": "two plus two", "responses": ["four", "six"], "ranks": [0, 1]},
    ]
    path = builders.build_dataset(
        Kind.COMPARISONS,
        "rm",
        tmp_path,
        {"train": write_jsonl(tmp_path / "c.jsonl", rows)},
        tokenizer=tok,
    )
    meta = builders.read_metadata(path)
    assert (meta["max_prompt_len"], meta["max_response_len"], meta["max_completions"]) == (3, 3, 3)
    loader = loaders.make_loader(path, "train", batch_size=2, seed=0, shuffle=False, num_epochs=1)
    (batch,) = list(loader)
    assert batch["tokens"].shape == (2, 3, 6) and batch["ranks"].shape == (2, 3)
    np.testing.assert_array_equal(batch["tokens"][0, 2], [*ids("a dog says the end"), EOS])
    np.testing.assert_array_equal(batch["tokens"][0, 0], [*ids("a dog says hello"), EOS, PAD])
    np.testing.assert_array_equal(batch["tokens"][1, 1], [*ids("two plus two six"), EOS, PAD])
    np.testing.assert_array_equal(batch["tokens"][1, 2], [PAD] * 6)  # invalid slot
    np.testing.assert_array_equal(batch["response_mask"][1], [[0, 0, 0, 1, 1, 0]] * 2 + [[0] * 6])
    np.testing.assert_array_equal(batch["attention_mask"][1, 0], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(batch["ranks"], [[0, 2, 2], [0, 1, -1]])
    np.testing.assert_array_equal(batch["valid"], [[1, 1, 1], [1, 1, 0]])


def test_prompts_and_pretraining_round_trip(tmp_path, tok):
    data = tmp_path / "data"
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is two"}, {"prompt": "a cat"}])
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "a cat says hello"}, {"text": "the end"}])
    prompts = builders.build_dataset("prompts", "ppo", data, {"train": p}, tokenizer=tok)
    text = builders.build_dataset("pretraining", "ptx", data, {"train": t}, tokenizer=tok)
    (b,) = loaders.make_loader(prompts, "train", batch_size=2, seed=0, shuffle=False, num_epochs=1)
    np.testing.assert_array_equal(b["prompt_tokens"], [ids("what is two"), [PAD, *ids("a cat")]])
    np.testing.assert_array_equal(b["prompt_mask"], [[1, 1, 1], [0, 1, 1]])
    (b,) = loaders.make_loader(
        text, "train", batch_size=2, seed=0, shuffle=False, num_epochs=1, text_len=5
    )
    np.testing.assert_array_equal(
        b["tokens"], [ids("a cat says hello") + [PAD], ids("the end") + [PAD] * 3]
    )
    np.testing.assert_array_equal(b["mask"], [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])


def test_python_records_and_their_errors(tmp_path, monkeypatch):
    system_tmp = tmp_path / "system_tmp"  # stands in for /tmp: building leaves nothing there
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    tmp_path = tmp_path / "data"
    records = [{"prompt": [5, 6], "responses": [[7, 1], np.array([8, 9, 1])], "ranks": [1, 0]}]
    path = builders.build_dataset("comparisons", "world", tmp_path, {"test": records}, eos_id=1)
    assert os.listdir(system_tmp) == []
    assert builders.read_metadata(path)["splits"] == {"test": 1}
    bad = [*records, {"prompt": [5], "responses": [[7, 1], [8, 2]], "ranks": [0, 1]}]
    with pytest.raises(DataError, match=r"^split 'test' record 1: field 'responses\[1\]': .*EOS"):
        builders.build_dataset("comparisons", "bad", tmp_path, {"test": bad}, eos_id=1)
    assert not (tmp_path / "rlhf_comparisons" / "bad").exists()
    assert sorted(os.listdir(tmp_path)) == ["rlhf_comparisons"]


def test_loader_rejects_shapes_below_the_data(tmp_path):
    path = builders.build_dataset("prompts", "p", tmp_path, {"train": [{"prompt": [3, 4, 5]}]})
    with pytest.raises(ValueError, match="prompt_len=2 is below the dataset's longest"):
        loaders.make_loader(path, "train", batch_size=1, seed=0, prompt_len=2)


# --- malformed input: file:line: field, and nothing written --------------------------------------

GOOD = {
    "demonstrations": {"prompt": "a cat", "response": "hello"},
    "comparisons": {"prompt": "a cat", "responses": ["hello", "it"], "ranks": [0, 1]},
    "prompts": {"prompt": "a cat"},
    "pretraining": {"text": "a cat says hello"},
}


def cmp(responses, ranks):
    return {"prompt": "a", "responses": responses, "ranks": ranks}


MALFORMED = [
    ("demonstrations", '{"prompt": "a cat", "response": "hello"', None, "invalid JSON"),
    ("demonstrations", '["a cat", "hello"]', None, "expected a JSON object, got array"),
    ("demonstrations", {"prompt": "a cat"}, "response", "missing"),
    ("demonstrations", {"prompt": 3, "response": "hi"}, "prompt", "expected a string, got number"),
    ("demonstrations", {"prompt": "a cat", "response": ""}, "response", "non-empty string"),
    ("demonstrations", {"prompt": "a cat", "response": "   "}, "response", "non-empty string"),
    ("prompts", {"prompt": None}, "prompt", "expected a string, got null"),
    ("pretraining", {"txt": "a cat"}, "text", "missing"),
    ("demonstrations", {"prompt": "a", "respones": "b"}, "response", r"has 'respones': a typo\?"),
    ("comparisons", cmp("it", [0]), "responses", "an array"),
    ("comparisons", cmp(["it", 7], [0, 1]), "responses[1]", "string"),
    ("comparisons", cmp(["it"], [0]), "responses", "K >= 2"),
    ("comparisons", {"prompt": "a", "responses": ["it", "a"]}, "ranks", "missing"),
    (
        "comparisons",
        cmp(["it", "a", "cat"], [0, 1]),
        "ranks",
        r"expected 3 integers \(one per response\), got 2$",
    ),
    ("comparisons", cmp(["it", "a"], [0, 1.5]), "ranks", "integers"),
    ("comparisons", cmp(["it", "a"], [0, "1"]), "ranks", "integers"),
    ("comparisons", cmp(["it", "a"], [0, True]), "ranks", "integers"),
    ("comparisons", cmp(["it", "a"], [0, -1]), "ranks", "negative"),
    ("comparisons", cmp(["it", "a"], [1, 1]), "ranks", "distinct"),
    # Budgets: P=3, R=3 (EOS included), T=4.
    ("prompts", {"prompt": "what is two plus"}, "prompt", "4 tokens, over data.prompt_len=3"),
    ("demonstrations", {"prompt": "a", "response": "hello the world"}, "response", "4 tokens"),
    ("comparisons", cmp(["it", "a b c"], [0, 1]), "responses[1]", "budget"),
]


@pytest.mark.parametrize("kind,line,field,message", MALFORMED)
def test_malformed_jsonl_names_file_line_field_and_writes_nothing(
    tmp_path, tok, kind, line, field, message
):
    src = write_jsonl(tmp_path / "train.jsonl", [GOOD[kind], "", line, GOOD[kind]])
    where = f"{src}:3: " + (f"field '{field}': " if field else "")
    budgets = {"max_prompt_len": 3, "max_response_len": 3, "max_text_len": 4}
    with pytest.raises(DataError, match=f"^{re.escape(where)}.*{message}"):
        load_records(src, kind, tok, **budgets)
    data = tmp_path / "data"
    with pytest.raises(DataError, match=re.escape(where)):
        builders.build_dataset(kind, "x", data, {"train": src}, tokenizer=tok, **budgets)
    assert not data.exists()  # not even the data_dir it would have created

    # An existing good dataset survives a failed overwrite untouched.
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD[kind]] * 3)
    path = builders.build_dataset(kind, "x", data, {"train": good}, tokenizer=tok, **budgets)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    with pytest.raises(DataError):
        builders.build_dataset(
            kind, "x", data, {"train": src}, tokenizer=tok, overwrite=True, **budgets
        )
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert sorted(os.listdir(data)) == [f"rlhf_{kind}"]  # no temporary directory left
    assert len(builders.open_source(path, "train")) == 3


def test_over_budget_records_are_counted_in_one_error_or_dropped(tmp_path, tok, caplog):
    # P = 3: the file's 2nd, 4th and 5th prompts are over it (4, 6 and 5 tokens).
    prompts = ["a cat", "what is two plus", "hello", "a cat says hello world the", "a a a a a"]
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    with pytest.raises(DataError) as e:
        load_records(src, "prompts", tok, max_prompt_len=3)
    assert str(e.value) == (
        f"{src}:2: field 'prompt': 4 tokens, over data.prompt_len=3. In all 5 records: 3 over "
        "data.prompt_len=3 (longest 6). Raise the budget (--config.data.prompt_len or "
        "response_len, in tokens), or skip such records with --config.data.too_long=drop"
    )
    with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
        kept = load_records(src, "prompts", tok, max_prompt_len=3, too_long="drop")
    assert [r["prompt"].tolist() for r in kept] == [ids("a cat"), ids("hello")]
    assert f"{src}: skipped 3 of 5 records over the length budgets" in caplog.text


def test_a_record_over_two_budgets_counts_for_both_and_dropping_all_is_an_error(tmp_path, tok):
    both = {"prompt": "what is two plus", "response": "hello the world cat"}  # 4 and 5 (EOS) tokens
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, both])
    budgets = {"max_prompt_len": 3, "max_response_len": 3}
    with pytest.raises(DataError, match=re.escape(
        "In all 2 records: 1 over data.prompt_len=3 (longest 4); 1 over data.response_len=3 "
        "(longest 5)."
    )):  # fmt: skip
        load_records(src, "demonstrations", tok, **budgets)
    only = write_jsonl(tmp_path / "only.jsonl", [both])
    with pytest.raises(DataError, match="all 1 records are over the length budgets"):
        load_records(only, "demonstrations", tok, **budgets, too_long="drop")


def test_held_out_text_is_whole_documents_cut_into_pieces_after(tmp_path, tok):
    # Pieces of one document on both sides would make the held-out NLL a training NLL.
    from rlhf_jax.configs import tiny
    from rlhf_jax.data import sources

    tok.save_pretrained(tmp_path / "tok")
    words = ["cat", "dog", "hello", "world"]
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join([w] * 10)} for w in words])
    config = tiny.get_config()
    data = dataclasses.replace(
        config.data, source="files", tokenizer=str(tmp_path / "tok"), pretraining=str(src),
        text_len=4, heldout_fraction=0.5,
    )  # fmt: skip
    config = dataclasses.replace(config, data=data)
    path = sources.get(config).build(config, tmp_path / "run", Kind.PRETRAINING)
    sides = [
        [r["text"].tolist() for r in builders.open_source(path, split)]
        for split in ("train", "heldout")
    ]
    for side in sides:  # each document's 10 tokens as pieces of 4, 4 and 2
        assert sorted(map(len, side)) == [2, 2, 4, 4, 4, 4]
    train_docs, held_docs = ({piece[0] for piece in side} for side in sides)
    assert len(train_docs) == len(held_docs) == 2 and not train_docs & held_docs


def test_long_pretraining_text_is_split_into_pieces_of_text_len(tmp_path, tok):
    doc = "a cat says hello world the cat says hello world"  # 10 tokens
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": doc}, {"text": "hello world"}])
    pieces = [r["text"].tolist() for r in load_records(src, "pretraining", tok, max_text_len=4)]
    assert pieces == [ids(doc)[:4], ids(doc)[4:8], ids(doc)[8:], ids("hello world")]


def test_existing_dataset_needs_overwrite(tmp_path):
    path = builders.build_dataset("prompts", "p", tmp_path, {"train": [{"prompt": [3]}]})
    with pytest.raises(FileExistsError):
        builders.build_dataset("prompts", "p", tmp_path, {"train": [{"prompt": [4]}]})
    records = [{"prompt": [4]}, {"prompt": [5]}]
    builders.build_dataset("prompts", "p", tmp_path, {"train": records}, overwrite=True)
    assert len(builders.open_source(path, "train")) == 2


# --- shuffling, resumable iterators, sharding ----------------------------------------------------


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """20 pretraining records; the first token of record i is i + 3, identifying it."""
    records = [{"text": [i + 3] + [7] * (i % 4)} for i in range(20)]
    root = tmp_path_factory.mktemp("numbered")
    return builders.build_dataset("pretraining", "n", root, {"train": records})


def first_tokens(batches):
    return [b["tokens"][:, 0].tolist() for b in batches]


def test_seeded_shuffle_is_deterministic(numbered):
    def run(seed):
        loader = loaders.make_loader(numbered, "train", batch_size=4, seed=seed, num_epochs=2)
        return first_tokens(loader)

    a = run(seed=1)
    assert a == run(seed=1)
    assert a != run(seed=2)
    epoch1, epoch2 = sum(a[:5], []), sum(a[5:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(3, 23))
    assert epoch1 != epoch2  # each epoch is a fresh permutation
    assert epoch1 != list(range(3, 23))


def test_iterator_state_restores_the_same_next_batches(numbered):
    def loader():
        return loaders.make_loader(numbered, "train", batch_size=3, seed=7, text_len=6)

    it = iter(loader())
    take(it, 5)
    state = json.loads(json.dumps(loaders.get_iterator_state(it)))  # as stored in a checkpoint
    raw = it.get_state()
    expected = take(it, 6)  # crosses the epoch boundary (20 records, 3 per batch)

    for saved in (state, raw):
        resumed = iter(loader())
        loaders.set_iterator_state(resumed, saved)
        for want, got in zip(expected, take(resumed, 6), strict=True):
            assert want.keys() == got.keys()
            for k in want:
                np.testing.assert_array_equal(want[k], got[k])


def test_two_shards_partition_the_data(numbered):
    seen = []
    for shard in range(2):
        loader = loaders.make_loader(
            numbered, "train", batch_size=2, seed=3, num_epochs=1, shard_index=shard, shard_count=2
        )
        seen.append(sum(first_tokens(loader), []))
    assert len(seen[0]) == len(seen[1]) == 10
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(3, 23))


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """13 comparison records of 2-4 completions each (a ragged K, so 'valid' varies)."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(13):
        k = 2 + i % 3
        records.append(
            {
                "prompt": [3 + i] * (1 + i % 3),
                "responses": [[4 + j] * (1 + (i + j) % 4) for j in range(k)],
                "ranks": rng.permutation(k).tolist(),
            }
        )
    return builders.build_dataset(
        "comparisons", "r", tmp_path_factory.mktemp("ranked"), {"train": records}
    )


class _Pack(grain.transforms.Map):
    def __init__(self, pack):
        self.pack = pack

    def map(self, element):
        return self.pack(element)


@pytest.mark.parametrize(
    "batch,epochs,drop,shard,shuffle",
    [(3, None, True, (0, 1), True), (2, 1, False, (1, 2), True), (4, 2, True, (0, 1), False)],
)
@pytest.mark.parametrize("data", ["numbered", "ranked"])
def test_batched_reads_give_grain_dataloaders_batches_and_state(
    data, batch, epochs, drop, shard, shuffle, request
):
    """Reference: grain.DataLoader over the same source, sampler and packing, which reads one
    record at a time. Same batches in the same order, the same state after every batch, and a
    state written by either restores in the other."""
    path = request.getfixturevalue(data)
    ours = loaders.make_loader(
        path,
        "train",
        batch_size=batch,
        seed=5,
        num_epochs=epochs,
        drop_remainder=drop,
        shard_index=shard[0],
        shard_count=shard[1],
        shuffle=shuffle,
    )

    def reference():
        return grain.DataLoader(
            data_source=ours.source,
            sampler=ours.sampler,
            operations=[_Pack(ours.pack), grain.transforms.Batch(batch, drop_remainder=drop)],
            worker_count=0,
            shard_options=ours.shard,
        )

    def same(a, b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])

    mine, theirs = iter(ours), iter(reference())
    limit = 12  # forever when epochs is None
    got, want = list(itertools.islice(mine, limit)), list(itertools.islice(theirs, limit))
    assert len(got) == len(want) >= 3
    for a, b in zip(got, want, strict=True):
        same(a, b)
    assert json.loads(mine.get_state()) == json.loads(theirs.get_state())

    # Cross-restores, one batch in.
    fresh_mine, fresh_theirs = iter(ours), iter(reference())
    take(fresh_mine, 1)
    take(fresh_theirs, 1)
    into_theirs, into_mine = iter(reference()), iter(ours)
    into_theirs.set_state(fresh_mine.get_state())
    loaders.set_iterator_state(into_mine, fresh_theirs.get_state())
    for a, b in zip(take(into_mine, 2), got[1:3], strict=True):
        same(a, b)
    for a, b in zip(take(into_theirs, 2), got[1:3], strict=True):
        same(a, b)
