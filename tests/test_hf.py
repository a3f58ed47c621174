"""hf.py: logits parity with transformers' PyTorch models, round trips, and error messages.

Reference numbers come from transformers' own PyTorch implementation, run on tiny random models
saved to a temporary directory. Weights are drawn with ``initializer_range=0.2`` and every norm
weight and bias is perturbed, so a wrong mapping cannot hide behind ones and zeros.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from rlhf_jax import hf
from rlhf_jax.config import ModelConfig, model_config
from rlhf_jax.model import Transformer, init_params

V = 101  # vocab
TOL = 1e-4

_COMMON = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
HF_MODELS = {
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(
            vocab_size=V,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            initializer_range=0.2,
            bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
    ),
    "llama-gqa-untied": lambda: T.LlamaForCausalLM(
        T.LlamaConfig(
            **_COMMON,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        )
    ),
    "qwen2-qkv-bias": lambda: T.Qwen2ForCausalLM(
        T.Qwen2Config(**_COMMON, tie_word_embeddings=True)
    ),
    "mistral-head-dim": lambda: T.MistralForCausalLM(
        T.MistralConfig(**_COMMON, head_dim=16, sliding_window=None, tie_word_embeddings=False)
    ),
}


def _random_hf_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = HF_MODELS[name]()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:  # norm weights around 1, biases around 0
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if pname.endswith("weight") else 0.0))
    return model.eval()


def _padded_batch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    tokens = rng.integers(0, V, size=(3, 9)).astype(np.int32)
    mask = np.zeros((3, 9), np.int32)
    for row, length in enumerate((9, 6, 3)):  # left padding
        mask[row, 9 - length :] = 1
    return tokens, mask


def _hf_logits(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens).long(),
            attention_mask=torch.from_numpy(mask).long(),
            position_ids=torch.from_numpy(positions).long(),
        )
    return out.logits.float().numpy()


def _our_logits(config: ModelConfig, params, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    apply = jax.jit(Transformer(config).apply)  # one compile instead of op-by-op dispatch
    return np.asarray(apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask)))


def _max_diff(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(ours[real] - theirs[real]).max())


def _assert_trees_equal(a, b) -> None:
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_logits_match_transformers(name, tmp_path):
    model = _random_hf_model(name)
    model.save_pretrained(tmp_path)
    config, params = hf.load_checkpoint(tmp_path)
    tokens, mask = _padded_batch(np.random.default_rng(0))
    ours, theirs = _our_logits(config, params, tokens, mask), _hf_logits(model, tokens, mask)
    diff = _max_diff(ours, theirs, mask)
    print(
        f"{name}: max |ours - transformers| = {diff:.2e} (logit scale {np.abs(theirs).max():.1f})"
    )
    assert diff <= TOL
    # transformers on each row alone, unpadded, agrees with our padded batch.
    for row in range(3):
        real = mask[row].astype(bool)
        alone = _hf_logits(model, tokens[row : row + 1, real], mask[row : row + 1, real])
        np.testing.assert_allclose(ours[row, real], alone[0], atol=TOL, rtol=0)


def test_expected_configs(tmp_path):
    _random_hf_model("qwen2-qkv-bias").save_pretrained(tmp_path / "q")
    _random_hf_model("mistral-head-dim").save_pretrained(tmp_path / "m")
    q, _ = hf.load_checkpoint(tmp_path / "q", dtype="bfloat16")
    m, params = hf.load_checkpoint(tmp_path / "m")
    assert (q.family, q.qkv_bias, q.use_bias, q.tie_embeddings, q.n_kv_heads) == (
        "llama", True, False, True, 2
    )  # fmt: skip
    assert q.dtype == "bfloat16" and q.norm_eps == 1e-6
    assert (m.head_dim, m.tie_embeddings) == (16, False)
    assert params["layers_0"]["attn"]["q"]["kernel"].shape == (32, 4, 16)
    assert params["layers_0"]["attn"]["k"]["kernel"].shape == (32, 2, 16)
    assert params["layers_0"]["attn"]["o"]["kernel"].shape == (4, 16, 32)


def test_sharded_and_bf16_checkpoints(tmp_path):
    model = _random_hf_model("llama-gqa-untied")
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    config, params = hf.load_checkpoint(tmp_path / "one")
    config_sharded, params_sharded = hf.load_checkpoint(tmp_path / "sharded")
    assert config_sharded == config
    _assert_trees_equal(params_sharded, params)

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, params_bf16 = hf.load_checkpoint(tmp_path / "bf16")
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(np.float32), params)
    _assert_trees_equal(params_bf16, rounded)
    _, params_bf16 = hf.load_checkpoint(tmp_path / "bf16", param_dtype="bfloat16")
    assert params_bf16["embed"].dtype == jnp.bfloat16


def test_bare_gpt2_model_names(tmp_path):
    """Hub GPT-2 checkpoints store ``GPT2Model`` names (no ``transformer.`` prefix)."""
    _random_hf_model("gpt2").save_pretrained(tmp_path / "lm")
    tensors = load_file(tmp_path / "lm" / "model.safetensors")
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()},
              bare / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    config_json = json.loads((tmp_path / "lm" / "config.json").read_text())
    config_json["architectures"] = ["GPT2Model"]
    (bare / "config.json").write_text(json.dumps(config_json))
    _assert_trees_equal(hf.load_checkpoint(bare)[1], hf.load_checkpoint(tmp_path / "lm")[1])


SAVE_CONFIGS = {
    "gpt2": model_config("tiny", vocab_size=V),
    "llama-gqa-untied": model_config("tiny-llama", vocab_size=V),
    "qwen2-tied": ModelConfig(
        family="llama",
        vocab_size=V,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        mlp_dim=64,
        use_bias=False,
        qkv_bias=True,
        norm_eps=1e-6,
        rope_theta=1e6,
    ),  # fmt: skip
    "llama-all-biases": ModelConfig(
        family="llama",
        vocab_size=V,
        d_model=32,
        n_heads=4,
        n_kv_heads=4,
        mlp_dim=48,
        use_bias=True,
        tie_embeddings=False,
        head_dim=16,
    ),  # fmt: skip
}


def _random_params(config: ModelConfig):
    """Every leaf random (norm scales around 1), drawn in NumPy: eager JAX init is slow on CPU."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(2)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (rng.normal(0.0, 0.3, s.shape) + (path[-1].key == "scale")).astype(
            np.float32
        ),
        abstract,
    )


@pytest.mark.parametrize("name", sorted(SAVE_CONFIGS))
def test_save_then_transformers_and_load(name, tmp_path):
    config = SAVE_CONFIGS[name]
    params = _random_params(config)
    hf.save_checkpoint(tmp_path, config, params)

    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    tokens, mask = _padded_batch(np.random.default_rng(1))
    diff = _max_diff(
        _our_logits(config, params, tokens, mask), _hf_logits(model, tokens, mask), mask
    )
    print(f"saved {name} as {type(model).__name__}: max |ours - transformers| = {diff:.2e}")
    assert diff <= TOL

    loaded_config, loaded = hf.load_checkpoint(tmp_path)
    assert loaded_config == config
    _assert_trees_equal(loaded, params)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def gpt2_dir(tmp_path):
    config = model_config("tiny", vocab_size=V)
    hf.save_checkpoint(tmp_path / "ckpt", config, _random_params(config))
    return tmp_path / "ckpt"


def _edit_config(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **fields}))


def test_unsupported_architecture(gpt2_dir):
    _edit_config(gpt2_dir, model_type="bert", architectures=["BertForMaskedLM"])
    with pytest.raises(hf.CheckpointError, match=r"model_type='bert'.*supported.*Qwen2ForCausal"):
        hf.load_checkpoint(gpt2_dir)
    _edit_config(gpt2_dir, model_type="gpt2", architectures=["GPT2ForTokenClassification"])
    with pytest.raises(hf.CheckpointError, match="GPT2ForTokenClassification"):
        hf.load_checkpoint(gpt2_dir)
    # A reward model is read as one (scalar head), so a causal LM's weights lack its head.
    _edit_config(gpt2_dir, architectures=["GPT2ForSequenceClassification"], num_labels=1)
    with pytest.raises(hf.CheckpointError, match="'score.weight'.*missing"):
        hf.load_checkpoint(gpt2_dir)


def test_unsupported_rope_scaling(tmp_path):
    config = model_config("tiny-llama", vocab_size=V)
    hf.save_checkpoint(tmp_path, config, _random_params(config))
    _edit_config(tmp_path, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1e4})  # fmt: skip
    with pytest.raises(hf.CheckpointError, match="rope scaling.*linear"):
        hf.load_checkpoint(tmp_path)


def test_missing_tensor(gpt2_dir):
    tensors = load_file(gpt2_dir / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, gpt2_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight.*model"):
        hf.load_checkpoint(gpt2_dir)


def test_shape_mismatch(gpt2_dir):
    tensors = load_file(gpt2_dir / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.weight"] = np.zeros((32, 64), np.float32)
    save_file(tensors, gpt2_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        hf.CheckpointError, match=r"c_attn\.weight.*expected shape \(32, 96\).*got \(32, 64\)"
    ):
        hf.load_checkpoint(gpt2_dir)


def test_missing_files(gpt2_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"modle: no such checkpoint directory"):
        hf.load_checkpoint(tmp_path / "modle")  # a typo, not a directory without config.json
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json.*empty"):
        hf.load_checkpoint(tmp_path / "empty")
    (gpt2_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        hf.load_checkpoint(gpt2_dir)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_reward_model_saves_as_sequence_classification(name, tmp_path):
    size = {"gpt2-tiny": "tiny", "llama-tiny": "tiny-llama"}[name]
    config = model_config(size, vocab_size=V, head="scalar")
    params = _random_params(config)
    hf.save_checkpoint(tmp_path, config, params, hf_overrides={"pad_token_id": V - 1})

    model = T.AutoModelForSequenceClassification.from_pretrained(tmp_path, local_files_only=True)
    tokens, mask = _padded_batch(np.random.default_rng(3))
    tokens = np.where(mask > 0, np.minimum(tokens, V - 2), V - 1)  # left padding with pad_token_id
    ours = _our_logits(config, params, tokens, mask)  # [B T]: the score at every position
    theirs = _hf_logits(model.eval(), tokens, mask)[:, 0]  # read at the last non-pad token
    # Our head has a bias, HF's has none: GPT-2 folds it into ln_f's bias (exact); Llama-family
    # models keep it as config.score_bias, to add to the logits.
    theirs = theirs + getattr(model.config, hf.SCORE_BIAS, 0.0)
    assert (hf.SCORE_BIAS in model.config.to_dict()) == (name == "llama-tiny")
    print(f"{name}: max |ours - transformers| = {np.abs(ours[:, -1] - theirs).max():.2e}")
    np.testing.assert_allclose(ours[:, -1], theirs, atol=TOL, rtol=0)

    loaded_config, loaded = hf.load_checkpoint(tmp_path)  # back into our params: the same model
    assert loaded_config == config
    np.testing.assert_allclose(_our_logits(config, loaded, tokens, mask), ours, atol=1e-5, rtol=0)


def test_load_tokenizer(gpt2_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(gpt2_dir)
    tokenizer = hf.load_tokenizer(gpt2_dir)
    assert tokenizer("hello there world")["input_ids"] == [1, 0, 2]
    shutil.rmtree(gpt2_dir)


def test_exported_rm_with_eos_as_pad_scores_at_the_eos_like_ours(tmp_path):
    # GPT-2's tokenizers pad with their EOS. transformers' classifier reads the score at the last
    # token that is not the pad, so it would skip the EOS every RM training response ends with.
    from tokenizers import Tokenizer, models, pre_tokenizers

    from rlhf_jax.export import RM_PAD_TOKEN, distinct_pad_token

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, V)}}  # the vocabulary fills the model
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    config = model_config("tiny", vocab_size=V, head="scalar")
    params = jax.tree.map(np.asarray, _random_params(config))
    ids = {"eos_token_id": 0, "pad_token_id": 0}
    texts = ["w5 w17 w3 w9 <eos>", "w8 <eos>", "w2 w2 w40 <eos>"]
    ours = []  # our score at each text's last token, its EOS, each text alone
    for text in texts:
        x = np.asarray([tok(text)["input_ids"]], np.int32)
        ours.append(float(_our_logits(config, params, x, np.ones_like(x))[0, -1]))

    def transformers_scores(directory):
        model = T.AutoModelForSequenceClassification.from_pretrained(directory).eval()
        loaded = T.AutoTokenizer.from_pretrained(directory)
        with torch.no_grad():
            return model(**loaded(texts, padding=True, return_tensors="pt")).logits[:, 0].numpy()

    as_is = tmp_path / "as_is"  # pad = EOS: the scores come from the token before the EOS
    hf.save_checkpoint(as_is, config, params, hf_overrides=ids)
    tok.save_pretrained(as_is)
    assert np.abs(transformers_scores(as_is) - ours).max() > 1e-2

    tok, new_config, new_params, new_ids = distinct_pad_token(tok, config, params, ids)
    assert tok.pad_token == RM_PAD_TOKEN and new_ids["pad_token_id"] == V == tok.pad_token_id
    assert new_config.vocab_size == V + 1 and not new_params["embed"][V:].any()
    fixed = tmp_path / "fixed"
    hf.save_checkpoint(fixed, new_config, new_params, hf_overrides=new_ids)
    tok.save_pretrained(fixed)
    np.testing.assert_allclose(transformers_scores(fixed), ours, atol=TOL, rtol=0)
