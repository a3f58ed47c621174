"""Configs and their fields: every field documented, overrides parsed by type, and validation
naming the field."""

import dataclasses

import pytest

from rlhf_jax import config as C
from rlhf_jax import fields
from rlhf_jax.configs import default, paper, tiny
from rlhf_jax.errors import ConfigError
from rlhf_jax.instructlang.config import InstructLangConfig


def _dataclasses(root):
    yield type(root)
    for f in dataclasses.fields(root):
        value = getattr(root, f.name)
        if dataclasses.is_dataclass(value):
            yield from _dataclasses(value)


def test_every_field_has_a_one_line_meaning():
    config = InstructLangConfig()
    docs = fields.field_docs(config)
    assert len(docs) > 100
    for path, _, doc in docs:
        assert doc and "\n" not in doc, f"{path} has no one-line meaning"
    # The meanings come from the dataclass declarations themselves.
    meta = {f.name: f.metadata["doc"] for f in dataclasses.fields(C.PPOConfig)}
    assert dict((p, d) for p, _, d in docs)["ppo.kl_coef"] == meta["kl_coef"]


@pytest.mark.parametrize("preset", [default, tiny, paper])
def test_presets_are_valid_world_configs(preset):
    config = preset.get_config()
    assert isinstance(config, InstructLangConfig) and config.data.source == "instructlang"
    assert config.validate() is config


def test_overrides_are_parsed_by_field_type():
    base = tiny.get_config()
    out = fields.apply_overrides(
        base,
        {
            "ppo.kl_coef": "0.1",
            "sft.epochs": "3",
            "ppo.whiten_rewards": "true",
            "model.family": "llama",
            "world.splits.test": "1_000",
            "mesh.rules": "(('batch', 'data'),)",
        },
    )
    assert out.ppo.kl_coef == 0.1 and out.sft.epochs == 3 and out.ppo.whiten_rewards is True
    assert out.model.family == "llama" and out.world.splits.test == 1000
    assert out.mesh.rules == (("batch", "data"),)
    assert type(out) is InstructLangConfig and base.ppo.kl_coef == 0.02  # a copy; base unchanged
    with pytest.raises(ConfigError, match=r"--config.sft.epochs=two: expected an integer"):
        fields.apply_overrides(base, {"sft.epochs": "two"})
    with pytest.raises(ConfigError, match="expected true or false"):
        fields.apply_overrides(base, {"ppo.whiten_rewards": "maybe"})


def test_an_unknown_field_suggests_the_closest_ones():
    config = default.get_config()
    with pytest.raises(
        ConfigError, match=r"ppo.kl_coeff: no such config field; did you mean ppo.kl_coef"
    ):
        fields.apply_overrides(config, {"ppo.kl_coeff": "0.1"})
    with pytest.raises(ConfigError, match="no such config field \\("):  # nothing close
        fields.apply_overrides(config, {"zzz": "1"})
    with pytest.raises(ConfigError, match="ppo.policy_optimizer is a section"):
        fields.apply_overrides(config, {"ppo.policy_optimizer": "1e-4"})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"model.family": "gpt3"}, "model.family='gpt3': expected one of 'gpt2', 'llama'"),
        ({"model.n_heads": "3"}, "model.n_heads=3: d_model=32 is not divisible by it"),
        ({"sft.epochs": "-1"}, "sft.epochs=-1: expected an integer >= 1"),
        ({"ppo.minibatch_size": "24"}, "ppo.minibatch_size=24: batch_size=32 is not a multiple"),
        ({"sft.ptx_fraction": "1.0"}, r"sft.ptx_fraction=1.0: expected a number >= 0 and < 1"),
        ({"mesh.fsdp": "0"}, "mesh.fsdp=0: expected -1 or a size >= 1"),
        ({"world.rm_k_max": "3"}, "world.rm_k_max=3: below rm_k_min=4"),
        ({"model.dtype": "fp8"}, "model.dtype='fp8': expected one of 'float32'"),
        ({"ppo.policy_optimizer.schedule": "linear"}, "schedule='linear': expected one of"),
        ({"methods": "dpo,bon"}, "methods='dpo,bon': unknown bon; expected any of"),
    ],
)
def test_validation_names_the_field(override, message):
    config = fields.apply_overrides(tiny.get_config(), override)
    with pytest.raises(ConfigError, match=message) as error:
        config.validate()
    assert "\n" not in str(error.value)


def test_head_dim_is_one_field_and_resolves_from_the_width():
    model = C.model_config("S")
    assert model.head_dim == 0 and model.resolved_head_dim == 32
    explicit = dataclasses.replace(model, head_dim=16)
    assert explicit.resolved_head_dim == 16 and explicit.validate() is explicit


def test_gpt2_sequences_must_fit_its_position_table():
    # Learned positions past max_len do not exist: found when the config is read, not as NaN.
    config = tiny.get_config()
    n = config.model.max_len
    long = fields.apply_overrides(config, {"data.response_len": str(n)})
    with pytest.raises(ConfigError, match=rf"data.response_len={n}: prompt_len \+ response_len"):
        long.validate()
    with pytest.raises(ConfigError, match=rf"data.text_len={n + 1}: over model.max_len={n}"):
        fields.apply_overrides(config, {"data.text_len": str(n + 1)}).validate()
    files = fields.apply_overrides(config, {"data.source": "files", "data.text_len": str(n + 1)})
    files.validate()  # no pretraining file: text_len is unused
    llama = fields.apply_overrides(config, {"model.family": "llama", "data.response_len": str(n)})
    llama.validate()  # rotary positions have no table
