"""Your model, your data: the recipe on tiny random Hugging Face checkpoints (a Llama policy, a
larger GPT-2 reward model), a BPE tokenizer with a chat template, HH-RLHF and TL;DR-style data,
through the CLI from `rlhf-jax pipeline` to the exported model loaded in transformers."""

import json
import os
import random

import jax
import numpy as np
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rlhf_jax import fields, rollout
from rlhf_jax.configs import hf as hf_preset
from rlhf_jax.rundir import RunDir
from rlhf_jax.stages.lineage import load_policy, load_reward_model, policy_model

SENTENCE = (
    "the cat dog sat on mat a is what where who why how good bad yes no please thanks summary "
    "post story help me write short long happy sad"
)
WORDS = SENTENCE.split(" ")
P, R = 96, 24  # prompt and response budgets, in tokens
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


pytestmark = pytest.mark.e2e  # every test reads the pipeline run through the CLI


def _words(rng, lo=3, hi=6):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _tokenizer(directory):
    """A byte-level BPE trained here on a few hundred sentences, with a chat template."""
    rng = random.Random(0)
    corpus = [_words(rng, 8, 14) for _ in range(300)] + ["\n\nHuman: \n\nAssistant:"] * 20
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    return tok


def _checkpoint(model, tokenizer, directory):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # larger weights than the default init, so
            if p.ndim == 1:  # that a tiny random model has a real preference between tokens
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _data(directory, tokenizer):
    """HH-RLHF transcripts (train) and TL;DR-style pairs (held out) as comparisons, chat-message
    demonstrations, plain prompts; JSONL."""
    rng = random.Random(1)

    def write(name, rows):
        path = directory / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def hh():
        turns = f"\n\nHuman: {_words(rng)}"
        if rng.random() < 0.5:  # a second turn: the prompt is everything through the last one
            turns += f"\n\nAssistant: {_words(rng)}\n\nHuman: {_words(rng)}"
        return {
            "chosen": f"{turns}\n\nAssistant: {_words(rng)}",
            "rejected": f"{turns}\n\nAssistant: {_words(rng)}",
        }

    messages = [
        {"messages": [{"role": "user", "content": _words(rng)},
                      {"role": "assistant", "content": _words(rng)}]}
        for _ in range(48)
    ]  # fmt: skip
    tldr = [
        {"prompt": f"post: {_words(rng)} summary:", "chosen": _words(rng), "rejected": _words(rng)}
        for _ in range(8)
    ]
    return {
        "demonstrations": write("demos.jsonl", messages),
        "comparisons": write("hh.jsonl", [hh() for _ in range(40)]),
        "comparisons_val": write("tldr.jsonl", tldr),
        "prompts": write(
            "prompts.jsonl",
            [{"prompt": f"\n\nHuman: {_words(rng)}\n\nAssistant:"} for _ in range(40)],
        ),  # fmt: skip
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    tokenizer = _tokenizer(root / "tokenizer")
    V = len(tokenizer)
    policy = _checkpoint(
        T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )),
        tokenizer,
        root / "policy",
    )  # fmt: skip
    reward = _checkpoint(  # a larger model of another family: InstructGPT's RM was 6B for all
        T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=V, n_positions=128, n_embd=48, n_layer=3, n_head=4,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )),
        tokenizer,
        root / "reward",
    )  # fmt: skip
    return root, tokenizer, policy, reward, _data(root, tokenizer)


SMALL = (
    f"--config.data.prompt_len={P}",
    f"--config.data.response_len={R}",
    "--config.sft.epochs=2",
    "--config.sft.batch_size=8",
    "--config.sft.optimizer.lr=1e-3",
    "--config.rm.batch_size=8",
    "--config.rm.optimizer.lr=1e-3",
    "--config.ppo.iterations=2",
    "--config.ppo.batch_size=8",
    "--config.ppo.minibatch_size=8",
    f"--config.ppo.max_new_tokens={R}",
    "--config.dpo.batch_size=8",
    "--config.grpo.iterations=1",
    "--config.grpo.batch_size=4",
    "--config.grpo.group_size=2",
    "--config.grpo.minibatch_size=8",
    f"--config.grpo.max_new_tokens={R}",
    "--config.eval.test_prompts=4",
    "--config.eval.samples_per_prompt=2",
    "--config.eval.batch_size=8",
    "--config.eval.samples_per_model=2",
    "--config.log_every=1",
)


@pytest.fixture(scope="module")
def run(world, rlhf_jax_cli):
    root, tokenizer, policy, reward, data = world
    args = [f"--config.data.{k}={v}" for k, v in data.items()]
    out = rlhf_jax_cli(
        "pipeline",
        f"--config=hf:{policy}",
        "--workdir=run",
        f"--config.rm.init_from={reward}",
        "--config.methods=best_of_n,dpo,grpo",
        "--config.eval.best_of_n=3",
        *args,
        *SMALL,
        cwd=root,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    config = hf_preset.get_config(policy)
    overrides = [(a[len("--config.") :].split("=", 1)) for a in (*args, *SMALL)]
    config = fields.apply_overrides(config, [(k, v) for k, v in overrides])
    config = fields.apply_overrides(config, {"rm.init_from": reward})
    return root, root / "run", config, out.stdout


def test_pipeline_runs_every_stage_and_reports(run):
    root, workdir, config, stdout = run
    assert config.model.family == "llama" and config.model.d_model == 32  # from the checkpoint
    summary = json.loads((workdir / "summary.json").read_text())
    # No pretraining text: no ptx, no base. The methods in the stage table's order; best-of-3 of
    # SFT by the RM, with its analytic KL.
    assert list(summary["models"]) == ["sft", "ppo", "dpo", "grpo", "best_of_n"]
    # DPO took every HH pair of the file (40 records, each one pair) in batches of 8, once.
    assert RunDir(workdir).committed_steps("dpo")[-1] == 40 // 8
    assert RunDir(workdir).committed_steps("grpo")[-1] == 1
    assert summary["models"]["best_of_n"]["kl_to_sft"] == pytest.approx(np.log(3) - 2 / 3)
    assert summary["models"]["best_of_n"]["samples_per_prompt"] == 2
    sft = summary["models"]["sft"]
    assert sft["rm_win_rate_vs_sft"] == 0.5 and sft["rm_gain_vs_sft"] == 0.0
    assert sft["kl_to_sft"] == 0.0 and sft["samples_per_prompt"] == 2
    assert 0.0 <= summary["models"]["ppo"]["eos_rate"] <= 1.0
    assert {"val_accuracy", "val_loss", "val_pairs"} <= set(summary["rm"])
    assert summary["rm"]["val_pairs"] == 8  # the TL;DR-style held-out file: 8 pairs
    report = (workdir / "report.md").read_text()
    assert "| ppo |" in report and "| best_of_n |" in report and "curve_score.png" in report
    # SFT logged a validation loss on held-out demonstrations (5% of the file), every epoch.
    rows = [json.loads(x) for x in (workdir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sum("val/loss" in r for r in rows) == 2
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # no duplicates
    # The RM is its own, larger model of another family (GPT-2, 48 wide, 3 layers).
    rm_model = json.loads((workdir / "rm" / "model.json").read_text())
    assert (rm_model["family"], rm_model["d_model"], rm_model["n_layers"]) == ("gpt2", 48, 3)
    ppo_config = json.loads((workdir / "ppo" / "config.json").read_text())
    assert ppo_config["rm"]["init_from"].endswith("reward")


def test_exported_policy_generates_like_rlhf_jax_generate(run, world, rlhf_jax_cli):
    root, workdir, config, _ = run
    tokenizer = world[1]
    export = workdir / "export" / "policy"
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(os.listdir(export))
    model = T.AutoModelForCausalLM.from_pretrained(export, local_files_only=True).eval()
    exported_tok = T.AutoTokenizer.from_pretrained(export, local_files_only=True)
    assert exported_tok.get_vocab() == tokenizer.get_vocab()
    prompts = ["\n\nHuman: what is a good cat\n\nAssistant:", "<s>user: help me write</s>\n"]
    gen = rlhf_jax_cli(
        "generate",
        f"--config=hf:{world[2]}",
        "--workdir=run",
        "--stage=ppo",
        "--temperature=0",
        f"--max_new_tokens={R}",
        *[f"--prompt={p}" for p in prompts],
        *SMALL,
        cwd=root,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    params = load_policy(config, workdir, "ppo")
    lines = [json.loads(x) for x in gen.stdout.strip().splitlines()[-2:]]
    for prompt, line in zip(prompts, lines):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=R,
                do_sample=False,
            )
        theirs = out[0, len(ids) :].tolist()
        ours = rollout.sample(
            params,
            policy_model(config),
            np.asarray([ids], np.int32),
            np.ones((1, len(ids)), np.int32),
            jax.random.key(0),
            max_new_tokens=R,
            greedy=True,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
        )
        n = int(np.asarray(ours.mask).sum())
        ours_ids = np.asarray(ours.tokens[0, :n]).tolist()
        theirs = theirs[: len(ours_ids)] if tokenizer.eos_token_id in ours_ids else theirs
        assert ours_ids == theirs, (prompt, ours_ids, theirs)
        assert line == {"prompt": prompt, "response": tokenizer.decode(ours_ids)}


def test_exported_reward_model_scores_like_rollout_minus_the_bias(run):
    root, workdir, config, _ = run
    export = workdir / "export" / "rm"
    model = T.AutoModelForSequenceClassification.from_pretrained(export, local_files_only=True)
    params, rm_model, bias = load_reward_model(config, workdir, source=workdir / "rm")
    assert rm_model.family == "gpt2" and float(bias) != 0.0
    rng = np.random.default_rng(0)
    for length in (5, 9, 14):
        tokens = rng.integers(4, rm_model.vocab_size, (1, length)).astype(np.int32)
        with torch.no_grad():
            theirs = float(model(torch.from_numpy(tokens).long()).logits[0, 0])
        resp = np.zeros_like(tokens)
        resp[:, 2:] = 1  # the score is read at the last response token: the last token here
        ours = rollout.reward_scores(
            params, rm_model, jax.numpy.asarray(tokens), np.ones_like(tokens), 2, resp[:, 2:],
            bias=bias,
        )  # fmt: skip
        assert abs(float(ours[0]) - theirs) < 1e-5, (length, float(ours[0]), theirs)


def test_the_export_follows_the_stage_it_was_made_from(run, tmp_path):
    # A rerun that adds PPO-ptx used to keep export/policy from plain PPO (and the report named
    # ppo_ptx beside it): an export is remade when the stage behind it is another.
    import shutil

    from rlhf_jax.export import SOURCE_FILE, export_current, export_stage

    _, workdir, config, _ = run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, symlinks=True)
    out = copy / "export" / "policy"
    assert json.loads((out / SOURCE_FILE).read_text())["stage"] == "ppo"
    weights = out / "model.safetensors"
    made = weights.stat().st_mtime_ns
    export_current(config, copy, "ppo", out)  # the same stage: kept as it is
    saved = copy / "ppo" / "config.json"
    settings = json.loads(saved.read_text())
    settings["eval"]["test_prompts"] += 1  # a rerun rewrites it; not a setting of the stage
    saved.write_text(json.dumps(settings))
    export_current(config, copy, "ppo", out)
    assert weights.stat().st_mtime_ns == made
    settings["ppo"]["kl_coef"] *= 2  # one of the stage's own: its export is made again
    saved.write_text(json.dumps(settings))
    export_current(config, copy, "ppo", out)
    assert weights.stat().st_mtime_ns != made
    export_current(config, copy, "sft", out)  # another stage: made again, whole
    assert json.loads((out / SOURCE_FILE).read_text())["stage"] == "sft"
    export_stage(config, copy, "sft", tmp_path / "sft")
    assert weights.read_bytes() == (tmp_path / "sft" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy", "rm"]  # no .new or .old


def test_eval_on_user_data_through_the_cli(run, world, rlhf_jax_cli):
    root, workdir, _, _ = run
    data = [f"--config.data.{k}={v}" for k, v in world[4].items()]
    args = ("eval", f"--config=hf:{world[2]}", "--workdir=run", "--stage=ppo", *data, *SMALL)
    out = rlhf_jax_cli(*args, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout[out.stdout.index("{") :])
    assert {"rm_score_mean", "rm_win_rate_vs_sft", "kl_to_sft", "eos_rate"} <= set(row)


def test_ppo_takes_its_reward_model_from_an_export(run, world, rlhf_jax_cli):
    root, workdir, _, _ = run
    data = [f"--config.data.{k}={v}" for k, v in world[4].items()]
    common = (f"--config=hf:{world[2]}", "--workdir=other", *data, *SMALL)
    assert rlhf_jax_cli("sft", *common, cwd=root).returncode == 0
    reward = str(workdir / "export" / "rm")  # the first run's RM, as transformers loads it
    out = rlhf_jax_cli(
        "ppo", *common, f"--config.ppo.reward_from={reward}", "--config.ppo.ptx_coef=0", cwd=root
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (root / "other" / "rm").exists()  # no RM of its own was trained
    rows = (root / "other" / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads(rows[0])["objective/kl"] == 0.0
