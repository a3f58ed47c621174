"""hf: the recipe on your Hugging Face checkpoint and your preference data.

    rlhf-jax pipeline --config=hf:/path/to/checkpoint --workdir=runs/mine \
        --config.data.demonstrations=demos.jsonl \
        --config.data.comparisons=hh-rlhf.jsonl \
        --config.data.prompts=prompts.jsonl

The argument is a local HF checkpoint directory (GPT-2, Llama, Qwen2, Mistral, SmolLM): it gives
the policy's architecture (``model.*``), its weights (``init_from``) and, unless
``data.tokenizer`` says otherwise, the tokenizer. Data files are JSONL or Parquet in the formats of
``rlhf_jax.data.formats``; each kind's held-out split comes from ``data.<kind>_val`` or a
``data.heldout_fraction`` of the file. Add ``--config.data.pretraining=text.jsonl`` for the
pretraining mix of SFT (``--config.sft.ptx_fraction=0.1``) and PPO-ptx, and the held-out NLL.
The pipeline runs SFT, RM, PPO (and PPO-ptx with pretraining text), evaluates by the RM, and
exports the policy and the RM under ``<workdir>/export/``.

Sizes are for a model of about 125M parameters (GPT-2 small, SmolLM2-135M) on one accelerator
with 16 GB: ``rlhf-jax plan --config=hf:<gpt2> --topology=v5e-1 --config.model.dtype=bfloat16``
(every stage compiled for the chip, no chip needed) puts the SFT step at 6.0 GiB per chip, the RM
step at 3.9 and the PPO iteration at 7.4. ``colab/your_data.ipynb`` halves the batches and turns
on ``model.remat`` for Colab's free T4, where the plan puts PPO at 10.4 GiB of 15 (float32).
Larger models: ``--config.model.lora.rank=16 --config.model.frozen_dtype=bfloat16`` trains
adapters over shared bfloat16 bases (about ten times these learning rates is usual for LoRA),
and ``--config.ppo.grad_accum=4`` (and ``sft.``, ``rm.``) splits each minibatch; so a
Llama-3.2-1B-shaped policy and RM fit PPO on one v5e chip (9.9 GiB, README "Will it fit?").
Learning rates follow InstructGPT appendix C for its 1.3B model (SFT 9.65e-6, RM 9e-6, value
9e-6; the policy LR inside its sweep). On a 2-core CPU, give a tiny checkpoint or much smaller
sizes.
"""

from rlhf_jax import config as C
from rlhf_jax.stages.lineage import adopt_architecture


def get_config(arg: str | None = None) -> C.Config:
    config = C.Config(
        name="hf",
        init_from=arg or "",
        data=C.DataConfig(source="files", prompt_len=192, response_len=64, text_len=256),
        sft=C.SFTConfig(
            epochs=2,
            batch_size=32,
            ptx_fraction=0.0,  # needs data.pretraining: set 0.1 (the paper's) with it
            dropout=0.0,
            optimizer=C.OptimizerConfig(lr=9.65e-6),
        ),
        rm=C.RMConfig(epochs=1, batch_size=16, optimizer=C.OptimizerConfig(lr=9e-6)),
        ppo=C.PPOConfig(
            iterations=100,
            batch_size=64,
            minibatch_size=16,
            max_new_tokens=64,
            kl_coef=0.05,
            ptx_coef=1.0,  # used only with data.pretraining (PPO-ptx)
            ptx_per_episode=2,
            policy_optimizer=C.OptimizerConfig(
                lr=3e-6, schedule="constant", warmup_steps=10, warmup_init_ratio=0.1
            ),
            value_optimizer=C.OptimizerConfig(lr=9e-6, schedule="constant"),
        ),
        eval=C.EvalConfig(test_prompts=200, samples_per_prompt=2, batch_size=32),
        checkpoint_minutes=10.0,
    )
    return adopt_architecture(config)
