"""Hugging Face checkpoint directories (config.json + safetensors) to and from our params.

``load_checkpoint(path)`` reads a local directory written by ``save_pretrained`` (one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``) into a ``ModelConfig``
and a plain nested dict of host NumPy arrays in ``param_dtype`` (put them on devices with
``jax.device_put`` or ``sharding``); ``save_checkpoint`` writes the reverse, which
``transformers.AutoModelForCausalLM.from_pretrained`` loads. transformers parses the configs and
tokenizers; tensors go through ``safetensors`` in NumPy (bfloat16 via ml_dtypes), never torch.

Supported: GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``), Llama, Qwen2 (q/k/v biases), Mistral (its
sliding window is not implemented, so outputs are exact only up to ``sliding_window`` tokens), and
the ``...ForSequenceClassification`` reward models of each family.

Name mapping: one table per family (``_TABLES``), used in both directions. ``i`` is the layer;
(L) marks a torch ``Linear`` weight, stored [out, in] and so transposed (GPT-2's ``Conv1D`` is
already [in, out]); a tensor feeding several params is split along its output axis. Each
``.weight`` maps to ``kernel`` (``scale`` for norms) and each ``.bias`` to ``bias``; rows for
params a config lacks (biases, an untied head) are skipped.

  GPT-2, prefix ``transformer.``      ours
  wte, wpe                            embed [V D], pos_embed [max_len D]
  h.i.ln_1, h.i.ln_2, ln_f            layers_i/attn_norm, layers_i/mlp_norm, final_norm
  h.i.attn.c_attn (fused q|k|v)       layers_i/attn/{q,k,v}: kernel [D H E], bias [H E]
  h.i.attn.c_proj                     layers_i/attn/o: kernel [H E D], bias [D]
  h.i.mlp.c_fc, h.i.mlp.c_proj        layers_i/mlp/fc, layers_i/mlp/down
  lm_head (L, untied only)            lm_head [D V]

  Llama/Qwen2/Mistral, prefix ``model.``
  embed_tokens, norm                  embed, final_norm
  layers.i.input_layernorm            layers_i/attn_norm
  layers.i.post_attention_layernorm   layers_i/mlp_norm
  layers.i.self_attn.{q,k,v,o}_proj   layers_i/attn/{q,k,v,o} (L); k, v: [D G E]
  layers.i.mlp.{gate,up,down}_proj    layers_i/mlp/{gate,up,down} (L)
  lm_head (L, untied only)            lm_head [D V]

RoPE in ``model.py`` uses HF's rotate-half layout, so q/k projections need no permutation.
A scalar head (``score_head``, a reward model) maps to ``score`` of ``...ForSequenceClassification``
with one label; HF's head has no bias, so ``save_checkpoint`` folds ours in (``_fold_score_bias``).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.config import ModelConfig
from rlhf_jax.errors import UserError
from rlhf_jax.model import init_params

# model_type -> (our family, architectures we accept).
SUPPORTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpt2": ("gpt2", ("GPT2LMHeadModel", "GPT2Model", "GPT2ForSequenceClassification")),
    "llama": ("llama", ("LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification")),
    "qwen2": ("llama", ("Qwen2ForCausalLM", "Qwen2Model", "Qwen2ForSequenceClassification")),
    "mistral": (
        "llama",
        ("MistralForCausalLM", "MistralModel", "MistralForSequenceClassification"),
    ),
}
# The config attribute that carries a reward model's scalar offset where HF's classification head
# (which has no bias) cannot: Llama-family models, whose final RMSNorm has no bias either.
SCORE_BIAS = "score_bias"
_PREFIX = {"gpt2": "transformer.", "llama": "model."}
# HF buffers and duplicates that carry no parameters of ours.
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that this module cannot read or a model it cannot write."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory without its config or weights files."""


class Row(NamedTuple):
    """One HF tensor: its name (``{i}`` = layer), our param paths, Linear [out, in] layout, and the
    number of leading input axes of our kernel (o: [H E D] has two)."""

    hf: str
    ours: tuple[str, ...]
    linear: bool = False
    n_in: int = 1


def _pair(
    hf: str, ours: str | tuple[str, ...], linear: bool = False, n_in: int = 1
) -> tuple[Row, Row]:
    """``hf.weight`` -> ``ours/kernel`` (``scale`` for norms), ``hf.bias`` -> ``ours/bias``."""
    ours = (ours,) if isinstance(ours, str) else ours
    weight = "scale" if "norm" in ours[0] else "kernel"
    return (
        Row(f"{hf}.weight", tuple(f"{o}/{weight}" for o in ours), linear, n_in),
        Row(f"{hf}.bias", tuple(f"{o}/bias" for o in ours)),
    )


_GPT2_LAYER = "transformer.h.{i}."
_LLAMA_LAYER = "model.layers.{i}."
_L = "layers_{i}/"
_TABLES: dict[str, tuple[Row, ...]] = {
    "gpt2": (
        Row("transformer.wte.weight", ("embed",)),
        Row("transformer.wpe.weight", ("pos_embed",)),
        *_pair("transformer.ln_f", "final_norm"),
        *_pair(_GPT2_LAYER + "ln_1", _L + "attn_norm"),
        *_pair(_GPT2_LAYER + "attn.c_attn", (_L + "attn/q", _L + "attn/k", _L + "attn/v")),
        *_pair(_GPT2_LAYER + "attn.c_proj", _L + "attn/o", n_in=2),
        *_pair(_GPT2_LAYER + "ln_2", _L + "mlp_norm"),
        *_pair(_GPT2_LAYER + "mlp.c_fc", _L + "mlp/fc"),
        *_pair(_GPT2_LAYER + "mlp.c_proj", _L + "mlp/down"),
        Row("lm_head.weight", ("lm_head/kernel",), linear=True),
        Row("score.weight", ("score_head/kernel",), linear=True),
    ),
    "llama": (
        Row("model.embed_tokens.weight", ("embed",)),
        Row("model.norm.weight", ("final_norm/scale",)),
        Row(_LLAMA_LAYER + "input_layernorm.weight", (_L + "attn_norm/scale",)),
        *_pair(_LLAMA_LAYER + "self_attn.q_proj", _L + "attn/q", linear=True),
        *_pair(_LLAMA_LAYER + "self_attn.k_proj", _L + "attn/k", linear=True),
        *_pair(_LLAMA_LAYER + "self_attn.v_proj", _L + "attn/v", linear=True),
        *_pair(_LLAMA_LAYER + "self_attn.o_proj", _L + "attn/o", linear=True, n_in=2),
        Row(_LLAMA_LAYER + "post_attention_layernorm.weight", (_L + "mlp_norm/scale",)),
        *_pair(_LLAMA_LAYER + "mlp.gate_proj", _L + "mlp/gate", linear=True),
        *_pair(_LLAMA_LAYER + "mlp.up_proj", _L + "mlp/up", linear=True),
        *_pair(_LLAMA_LAYER + "mlp.down_proj", _L + "mlp/down", linear=True),
        Row("lm_head.weight", ("lm_head/kernel",), linear=True),
        Row("score.weight", ("score_head/kernel",), linear=True),
    ),
}


# ----------------------------------------------------------------------------- mapping


def _param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    flat = traverse_util.flatten_dict(abstract, sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def _rows(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[Row]:
    """The table expanded over layers, restricted to the params this config has."""
    rows = []
    for row in _TABLES[config.family]:
        for i in range(config.n_layers) if "{i}" in row.hf else [0]:
            ours = tuple(p.format(i=i) for p in row.ours)
            if all(p in shapes for p in ours):
                rows.append(row._replace(hf=row.hf.format(i=i), ours=ours))
    # The scalar head's bias has no HF tensor: it is folded in (see save_checkpoint).
    unmapped = sorted(set(shapes) - {p for r in rows for p in r.ours} - {"score_head/bias"})
    if unmapped:
        raise CheckpointError(
            f"params {unmapped} have no Hugging Face tensor "
            f"(family={config.family!r}, head={config.head!r})"
        )
    return rows


def _is_vector(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ("bias", "scale")


def _hf_shape(row: Row, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    n_in = 0 if _is_vector(row.ours[0]) else row.n_in
    out = sum(math.prod(shapes[p][n_in:]) for p in row.ours)
    if n_in == 0:
        return (out,)
    rows = math.prod(shapes[row.ours[0]][:n_in])
    return (out, rows) if row.linear else (rows, out)


def _to_hf(row: Row, arrays: list[np.ndarray]) -> np.ndarray:
    if _is_vector(row.ours[0]):
        return np.concatenate([a.reshape(-1) for a in arrays])
    x = np.concatenate([a.reshape(math.prod(a.shape[: row.n_in]), -1) for a in arrays], axis=-1)
    return np.ascontiguousarray(x.T if row.linear else x)


def _from_hf(row: Row, x: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> list[np.ndarray]:
    n_in = 0 if _is_vector(row.ours[0]) else row.n_in
    if row.linear:
        x = x.T
    sizes = [math.prod(shapes[p][n_in:]) for p in row.ours]
    parts = np.split(x, np.cumsum(sizes)[:-1], axis=-1)
    return [
        np.ascontiguousarray(part.reshape(shapes[p]))
        for part, p in zip(parts, row.ours, strict=True)
    ]


# ----------------------------------------------------------------------------- configs


def _from_hf_config(c: Any, model_type: str, **overrides: Any) -> ModelConfig:
    family = SUPPORTED[model_type][0]
    if family == "gpt2":
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise CheckpointError(
                f"GPT-2 activation_function={c.activation_function!r} is not supported "
                "(only the tanh GELU: gelu_new, gelu_pytorch_tanh, gelu_fast)"
            )
        if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
            raise CheckpointError(
                "GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported "
                "(scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True)"
            )
        fields = dict(
            vocab_size=c.vocab_size, d_model=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
            n_kv_heads=c.n_head, mlp_dim=c.n_inner or 4 * c.n_embd, max_len=c.n_positions,
            norm_eps=c.layer_norm_epsilon, use_bias=True,
        )  # fmt: skip
    else:
        rope = dict(getattr(c, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(
                f"rope scaling rope_type={rope_type!r} ({rope}) is not supported: only 'default' "
                "(plain RoPE with rope_theta, partial_rotary_factor 1) is implemented"
            )
        if c.hidden_act != "silu":
            raise CheckpointError(f"hidden_act={c.hidden_act!r} is not supported (only 'silu')")
        attn_bias = bool(getattr(c, "attention_bias", False))
        mlp_bias = bool(getattr(c, "mlp_bias", False))
        if model_type != "qwen2" and attn_bias != mlp_bias:
            raise CheckpointError(
                f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                "(both or neither)"
            )
        window, layer_types = getattr(c, "sliding_window", None), getattr(c, "layer_types", None)
        if window and (model_type == "mistral" or "sliding_attention" in (layer_types or ())):
            warnings.warn(
                f"sliding_window={window} is not implemented: outputs are exact only for "
                f"sequences of at most {window} tokens",
                stacklevel=3,
            )
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        fields = dict(
            family="llama", vocab_size=c.vocab_size, d_model=c.hidden_size,
            n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
            head_dim=0 if head_dim * c.num_attention_heads == c.hidden_size else head_dim,
            mlp_dim=c.intermediate_size, max_len=c.max_position_embeddings,
            norm_eps=c.rms_norm_eps, rope_theta=float(rope.get("rope_theta", 10000.0)),
            use_bias=attn_bias and mlp_bias, qkv_bias=model_type == "qwen2",
        )  # fmt: skip
    fields["tie_embeddings"] = bool(c.tie_word_embeddings)
    return ModelConfig(**fields, **overrides).validate()


def _to_hf_config(config: ModelConfig, overrides: dict[str, Any]) -> Any:
    E = config.resolved_head_dim
    if config.family == "gpt2":
        if not config.use_bias or config.n_kv_heads != config.n_heads:
            raise CheckpointError(
                "GPT-2 needs use_bias=True and n_kv_heads == n_heads to be saved in HF format"
            )
        if E * config.n_heads != config.d_model:
            raise CheckpointError("GPT-2 needs head_dim == d_model // n_heads")
        cls, arch = transformers.GPT2Config, "GPT2LMHeadModel"
        fields = dict(
            n_positions=config.max_len, n_embd=config.d_model, n_layer=config.n_layers,
            n_head=config.n_heads, n_inner=config.mlp_dim, layer_norm_epsilon=config.norm_eps,
            activation_function="gelu_new", resid_pdrop=config.dropout,
            embd_pdrop=config.dropout, attn_pdrop=0.0,
        )  # fmt: skip
    else:
        if config.qkv_bias and not config.use_bias:
            cls, arch, fields = transformers.Qwen2Config, "Qwen2ForCausalLM", {}
        else:
            cls, arch = transformers.LlamaConfig, "LlamaForCausalLM"
            fields = dict(attention_bias=config.use_bias, mlp_bias=config.use_bias)
        fields.update(
            hidden_size=config.d_model, intermediate_size=config.mlp_dim,
            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads, head_dim=E,
            max_position_embeddings=config.max_len, rms_norm_eps=config.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            hidden_act="silu",
        )  # fmt: skip
    defaults = cls()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids from the preset's vocab
        token = getattr(defaults, name, None)
        fields[name] = token if isinstance(token, int) and token < config.vocab_size else None
    if config.head == "scalar":  # a reward model: the same trunk under a one-label classifier
        arch = arch.replace("LMHeadModel", "ForSequenceClassification").replace(
            "ForCausalLM", "ForSequenceClassification"
        )
    fields.update(
        vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings,
        architectures=[arch], dtype=config.param_dtype,
    )  # fmt: skip
    return cls(**{**fields, **overrides})


# ----------------------------------------------------------------------------- public API


def _read_config(path: Path) -> tuple[Any, str, bool]:
    """(HF config, model_type, whether it is a sequence-classification model) of a directory."""
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"no config.json in checkpoint directory {path}")
    raw = json.loads(config_file.read_text())
    model_type, archs = raw.get("model_type"), raw.get("architectures") or []
    supported = ", ".join(f"{a} ({t})" for t, (_, names) in SUPPORTED.items() for a in names)
    if model_type not in SUPPORTED or any(a not in SUPPORTED[model_type][1] for a in archs):
        raise CheckpointError(
            f"unsupported model: model_type={model_type!r}, architectures={archs} in "
            f"{config_file}; supported architectures: {supported}"
        )
    scalar = any(a.endswith("ForSequenceClassification") for a in archs)
    if scalar and raw.get("num_labels", len(raw.get("id2label") or [0])) != 1:
        raise CheckpointError(f"{config_file}: a reward model needs num_labels=1")
    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    return hf_config, model_type, scalar


def load_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of a local HF checkpoint directory, without reading its weights
    (``head="scalar"`` for a ``...ForSequenceClassification`` reward model)."""
    hf_config, model_type, scalar = _read_config(Path(path))
    if scalar:
        overrides = {"head": "scalar", **overrides}
    return _from_hf_config(hf_config, model_type, **overrides)


class Checkpoint(NamedTuple):
    """A Hugging Face checkpoint read into rlhf_jax: its architecture and its params."""

    model: ModelConfig
    params: dict[str, Any]


def load_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    dropout: float = 0.0,
) -> Checkpoint:
    """Read a local HF checkpoint directory into its architecture and params.

    A causal LM gives ``head="lm"``; a ``...ForSequenceClassification`` model with one label (a
    reward model, e.g. one written by ``save_checkpoint``) gives ``head="scalar"``, its head bias
    the config's ``score_bias`` (0 when absent). ``dtype`` is the compute dtype and
    ``param_dtype`` the dtype of the returned NumPy arrays; ``dropout`` is ours (HF's dropout rates
    are ignored). Raises ``CheckpointNotFoundError`` for a missing config or weights file and
    ``CheckpointError`` for unsupported models, missing tensors and shape mismatches, each naming
    the culprit.
    """
    path = Path(path)
    hf_config, model_type, scalar = _read_config(path)
    config = _from_hf_config(
        hf_config,
        model_type,
        dtype=dtype,
        param_dtype=param_dtype,
        dropout=dropout,
        head="scalar" if scalar else "lm",
    )

    # Where each tensor lives.
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
        where = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    elif single.is_file():
        with safe_open(single, framework="np") as f:
            where = dict.fromkeys(f.keys(), single)
    else:
        raise CheckpointNotFoundError(
            f"no weights in {path}: expected {single.name} or {index.name}"
        )
    listing, prefix = (index if index.is_file() else single), _PREFIX[config.family]
    stored = {k: k for k in where}  # our HF name -> name in the file
    if not any(k.startswith(prefix) for k in where):  # GPT2Model-style names, without the prefix
        heads = ("lm_head.", "score.")
        stored = {(k if k.startswith(heads) else prefix + k): k for k in where}

    shapes = _param_shapes(config)
    rows = _rows(config, shapes)
    by_file: dict[Path, list[Row]] = {}
    for row in rows:
        if row.hf not in stored:
            raise CheckpointError(f"tensor {row.hf!r} ({list(row.ours)}) missing from {listing}")
        by_file.setdefault(where[stored[row.hf]], []).append(row)

    flat, pdt = {}, jnp.dtype(param_dtype)
    for file, file_rows in by_file.items():
        if not file.is_file():
            raise CheckpointNotFoundError(f"weights file {file} (listed in {listing}) is missing")
        with safe_open(file, framework="np") as f:
            names = set(f.keys())
            for row in file_rows:
                if stored[row.hf] not in names:
                    raise CheckpointError(f"tensor {row.hf!r} missing from {file}")
                x = f.get_tensor(stored[row.hf])
                expected = _hf_shape(row, shapes)
                if x.shape != expected:
                    raise CheckpointError(
                        f"tensor {row.hf!r} in {file}: expected shape {expected} for "
                        f"{list(row.ours)}, got {x.shape}"
                    )
                for p, part in zip(row.ours, _from_hf(row, x.astype(pdt), shapes), strict=True):
                    flat[p] = part
    if scalar:
        bias = float(getattr(hf_config, SCORE_BIAS, 0.0) or 0.0)
        flat["score_head/bias"] = np.full(shapes["score_head/bias"], bias, pdt)

    used = {r.hf for r in rows} | ({"lm_head.weight"} if config.tie_embeddings else set())
    unused = sorted(k for k in stored if k not in used and not _IGNORED.search(k))
    if unused:
        warnings.warn(f"ignored {len(unused)} tensors of {path}: {unused[:8]}", stacklevel=2)
    return Checkpoint(config, traverse_util.unflatten_dict(flat, sep="/"))


def _fold_score_bias(config: ModelConfig, flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fold the scalar head's bias into what HF's bias-free classification head can carry.

    GPT-2: ``score = w . (ln_f(x)) + b``, and ``ln_f`` ends in ``+ beta``, so ``beta += b w /
    |w|^2`` adds exactly ``b`` to the score at every position (the LM head is gone, so nothing
    else reads ``ln_f``). Llama-family norms have no bias: the offset goes to the config field
    ``score_bias`` instead, which ``load_checkpoint`` reads back and an HF user adds to the logits.
    Returns the HF config fields to add.
    """
    b = float(np.asarray(flat.pop("score_head/bias")).reshape(-1)[0])
    if config.family != "gpt2":
        return {SCORE_BIAS: b, "num_labels": 1}
    w = np.asarray(flat["score_head/kernel"], np.float64).reshape(-1)
    beta = np.asarray(flat["final_norm/bias"], np.float64)
    flat["final_norm/bias"] = (beta + b * w / np.dot(w, w)).astype(flat["final_norm/bias"].dtype)
    return {"num_labels": 1}


def save_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    params: Any,
    *,
    hf_overrides: dict[str, Any] | None = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers loads.

    A causal LM (``head="lm"``) loads with ``AutoModelForCausalLM``: GPT-2 configs become
    ``GPT2LMHeadModel``; Llama-family configs become ``Qwen2ForCausalLM`` when they have q/k/v
    biases only, else ``LlamaForCausalLM``. A scalar-head model (a reward model) loads with
    ``AutoModelForSequenceClassification`` (``...ForSequenceClassification``, ``num_labels=1``),
    its head bias folded in (``_fold_score_bias``) so that its logits equal our scores.
    ``hf_overrides`` are extra HF config fields (e.g. ``eos_token_id``, ``pad_token_id``: HF's
    classifier reads the score at the last token that is not ``pad_token_id``); token ids of the
    HF defaults outside the vocabulary are dropped. Params must be fully addressable from this
    process (gather them first on multi-host).
    """
    overrides = dict(hf_overrides or {})
    shapes = _param_shapes(config)
    rows = _rows(config, shapes)
    flat = {
        k: np.asarray(v)
        for k, v in traverse_util.flatten_dict(jax.device_get(params), sep="/").items()
    }
    for name, shape in shapes.items():
        if name not in flat:
            raise CheckpointError(f"param {name!r} missing from params for {config}")
        if tuple(np.shape(flat[name])) != shape:
            raise CheckpointError(
                f"param {name!r}: expected shape {shape}, got {tuple(np.shape(flat[name]))}"
            )
    if config.head == "scalar":
        overrides = {**_fold_score_bias(config, flat), **overrides}
    hf_config = _to_hf_config(config, overrides)
    tensors = {r.hf: _to_hf(r, [flat[p] for p in r.ours]) for r in rows}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(path)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapters(
    path: str | os.PathLike, config: ModelConfig, adapters: Any, *, base: str = ""
) -> list[str]:
    """Write a LoRA model's adapters as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base_model, path)``
    loads onto the HF export of its base. Returns the adapted HF modules.

    Each of our adapted Dense layers is a torch module of the family's table: ``lora_A.weight``
    is our ``lora_a`` [*in, r] as [r, in], ``lora_B.weight`` our ``lora_b`` [r, *out] as [out, r].
    GPT-2's fused ``c_attn`` (q|k|v in one ``Conv1D``) gets one adapter of rank n r over the n
    adapted parts, A stacked and B block-diagonal, which is the same update exactly; PEFT's
    ``rank_pattern`` and ``alpha_pattern`` give it that rank and the same scale alpha / r.
    ``base`` is written as ``base_model_name_or_path``."""
    lora = config.lora
    flat = {
        k: np.asarray(v, np.float32)
        for k, v in traverse_util.flatten_dict(jax.device_get(adapters), sep="/").items()
    }
    shapes = _param_shapes(config)
    tensors, modules, ranks, alphas = {}, [], {}, {}
    for row in _rows(config.plain(), {k: v for k, v in shapes.items() if "lora_" not in k}):
        if _is_vector(row.ours[0]) or row.ours[0].startswith(("embed", "pos_embed", "lm_head")):
            continue
        parts = [p.rsplit("/", 1)[0] for p in row.ours]  # the Dense modules of this tensor
        present = [m for m in parts if f"{m}/lora_a" in flat]
        if not present:
            continue
        module = row.hf.rsplit(".", 1)[0]
        a_parts, b_blocks, r = [], [], lora.rank
        for m in parts:
            out = math.prod(shapes[f"{m}/kernel"][row.n_in :])
            if m in present:
                a_parts.append(flat[f"{m}/lora_a"].reshape(-1, r))  # [in, r]
                b_blocks.append((flat[f"{m}/lora_b"].reshape(r, out), out))
            else:
                b_blocks.append((None, out))
        a = np.concatenate(a_parts, axis=1)  # [in, n r]
        n = len(present)
        b = np.zeros((n * r, sum(out for _, out in b_blocks)), np.float32)
        col, k = 0, 0
        for block, out in b_blocks:
            if block is not None:
                b[k * r : (k + 1) * r, col : col + out] = block
                k += 1
            col += out
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
        modules.append(module)
        if n > 1:
            ranks[module], alphas[module] = n * r, n * lora.alpha
    if not modules:
        raise CheckpointError("no adapters to write: the params hold no lora_a/lora_b leaves")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if config.head == "lm" else "SEQ_CLS",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "fan_in_fan_out": config.family == "gpt2",  # GPT-2's Conv1D stores weights [in, out]
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return modules


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in a local directory (never downloads), padding on the left, the side
    prompts must be padded on for generation (``rollout.sample``)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer
