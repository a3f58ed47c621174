"""The field's preference-data formats, Parquet files, held-out splits and fingerprints."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from rlhf_jax.configs import tiny
from rlhf_jax.data import builders, files, formats, sources
from rlhf_jax.data.records import DataError, Kind
from rlhf_jax.fields import apply_overrides

WORDS = ["Human:", "Assistant:", "user:", "assistant:", "hi", "there", "what", "is", "up"]
WORDS += ["fine", "good", "bad", "<s>", "</s>", chr(10)]  # chr(10): a newline, for templates


@pytest.fixture(scope="module")
def tok():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def test_hh_transcripts_split_at_the_last_shared_assistant_turn(tok):
    row = {
        "chosen": "\n\nHuman: hi\n\nAssistant: fine\n\nHuman: what is up\n\nAssistant: good",
        "rejected": "\n\nHuman: hi\n\nAssistant: fine\n\nHuman: what is up\n\nAssistant: bad",
    }
    rec = formats.to_text_record(Kind.COMPARISONS, row, tok, "f:1")
    assert rec == {
        "prompt": "\n\nHuman: hi\n\nAssistant: fine\n\nHuman: what is up\n\nAssistant:",
        "responses": [" good", " bad"],
        "ranks": [0, 1],
    }
    # Answers that start alike still split at the turn, not inside the answer.
    alike = {
        "chosen": "\n\nHuman: hi\n\nAssistant: good fine",
        "rejected": "\n\nHuman: hi\n\nAssistant: good",
    }
    rec = formats.to_text_record(Kind.COMPARISONS, alike, tok, "f:2")
    assert rec["responses"] == [" good fine", " good"]
    with pytest.raises(DataError, match="f:3: field 'chosen': expected HH-RLHF transcripts"):
        formats.to_text_record(Kind.COMPARISONS, {"chosen": "hi", "rejected": "up"}, tok, "f:3")


def test_pairwise_k_wise_and_chat_pairs(tok):
    pair = {"prompt": "what is up", "chosen": "good", "rejected": "bad"}
    assert formats.to_text_record(Kind.COMPARISONS, pair, tok, "f:1") == {
        "prompt": "what is up",
        "responses": ["good", "bad"],
        "ranks": [0, 1],
    }
    user = {"role": "user", "content": "what is up"}
    chat = {
        "chosen": [user, {"role": "assistant", "content": "good"}],
        "rejected": [user, {"role": "assistant", "content": "bad"}],
    }
    rec = formats.to_text_record(Kind.COMPARISONS, chat, tok, "f:2")  # no chat template: HH form
    assert rec["prompt"] == "\n\nHuman: what is up\n\nAssistant:"
    assert rec["responses"] == [" good", " bad"]
    with pytest.raises(DataError, match="field 'rejected': missing; expected"):
        formats.to_text_record(Kind.COMPARISONS, {"chosen": "x"}, tok, "f:3")
    with pytest.raises(DataError, match="field 'ranks': missing"):
        formats.to_text_record(Kind.COMPARISONS, {"prompt": "p", "responses": ["a"]}, tok, "f:4")


def test_messages_use_the_chat_template(tok):
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }}: {{ m['content'] }} </s> \n{% endfor %}"
        "{% if add_generation_prompt %}<s> assistant:{% endif %}"
    )
    row = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"}]
    }
    rec = formats.to_text_record(Kind.DEMONSTRATIONS, row, tok, "f:1")
    assert rec == {"prompt": "<s> user: hi </s> \n<s> assistant:", "response": " fine </s>"}
    prompt = formats.to_text_record(Kind.PROMPTS, {"messages": row["messages"][:1]}, tok, "f:2")
    assert prompt == {"prompt": "<s> user: hi </s> \n<s> assistant:"}
    with pytest.raises(DataError, match="end with an assistant message"):
        formats.to_text_record(Kind.DEMONSTRATIONS, {"messages": row["messages"][:1]}, tok, "f:3")
    bad = {"messages": [{"role": "robot", "content": "hi"}]}
    with pytest.raises(DataError, match=r"field 'messages\[0\].role': expected one of"):
        formats.to_text_record(Kind.PROMPTS, bad, tok, "f:4")


def test_parquet_reads_like_jsonl(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "what is up", "response": "good"}, {"prompt": "hi", "response": "fine"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a = files.load_records(tmp_path / "d.jsonl", "demonstrations", tok)
    b = files.load_records(tmp_path / "d.parquet", "demonstrations", tok)
    assert [{k: list(v) for k, v in r.items()} for r in a] == [
        {k: list(v) for k, v in r.items()} for r in b
    ]
    assert files.count_rows(tmp_path / "d.parquet") == 2
    pq.write_table(pa.Table.from_pylist([{"prompt": "hi"}]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:row 1: field 'response': missing"):
        files.load_records(tmp_path / "bad.parquet", "demonstrations", tok)
    with pytest.raises(DataError, match="expected a .jsonl or .parquet file"):
        files.load_records(tmp_path / "d.json", "demonstrations", tok)


def _files_config(tmp_path, tok, demos, **overrides):
    tok.save_pretrained(tmp_path / "tok")
    config = apply_overrides(
        tiny.get_config(),
        {
            "data.source": "files",
            "data.tokenizer": str(tmp_path / "tok"),
            "data.demonstrations": str(demos),
            **overrides,
        },
    )
    return config


def test_held_out_fraction_and_reimport_on_change(tmp_path, tok):
    demos = tmp_path / "demos.jsonl"
    rows = [{"prompt": "hi " * (i % 3 + 1), "response": "fine"} for i in range(40)]
    demos.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _files_config(tmp_path, tok, demos, **{"data.heldout_fraction": "0.1"})
    work = tmp_path / "run"
    assert sources.expected_size(config, work, "sft") == 36  # known before anything is built
    path, _ = sources.dataset(config, work, "sft")
    counts = builders.read_metadata(path)["splits"]
    assert counts == {"sft_train": 36, "sft_val": 4}
    held = [np.asarray(x["prompt"]).tolist() for x in builders.open_source(path, "sft_val")]
    before = (path / "dataset_info.json").stat().st_mtime_ns
    sources.dataset(config, work, "sft")  # unchanged input: reused as it is
    assert (path / "dataset_info.json").stat().st_mtime_ns == before
    again = sources.dataset(config, tmp_path / "other", "sft")[0]  # the same held-out records
    assert held == [
        np.asarray(x["prompt"]).tolist() for x in builders.open_source(again, "sft_val")
    ]

    demos.write_text(demos.read_text() + json.dumps(rows[0]) + "\n")  # the file changes
    assert not sources.is_current(config, work, Kind.DEMONSTRATIONS)
    sources.dataset(config, work, "sft")
    assert sum(builders.read_metadata(path)["splits"].values()) == 41  # imported again
    longer = apply_overrides(config, {"data.prompt_len": "20"})  # a length budget changes too
    assert not sources.is_current(longer, work, Kind.DEMONSTRATIONS)
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps(rows[1]) + "\n")
    with_val = apply_overrides(config, {"data.demonstrations_val": str(val)})
    assert sources.expected_size(with_val, work, "sft_val") == 1
    assert sources.expected_size(with_val, work, "sft") == 41
