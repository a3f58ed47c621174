"""Accelerator detection and the settings it implies; the report's inline images for notebooks."""

import base64
import dataclasses
from types import SimpleNamespace

import jax
import pytest

from rlhf_jax import accelerator, report
from rlhf_jax.configs import hf as hf_preset
from rlhf_jax.configs import tiny


def test_detect_sees_the_local_cpu_devices():
    here = accelerator.detect()
    assert (here.platform, here.count, here.bfloat16) == ("cpu", jax.local_device_count(), False)
    assert here.compute_dtype == "float32" and str(here).startswith(f"{here.count} x ")


@pytest.mark.parametrize(
    "device, fast",
    [
        (SimpleNamespace(platform="tpu"), True),
        (SimpleNamespace(platform="gpu", compute_capability="7.5"), False),  # Colab's T4
        (SimpleNamespace(platform="gpu", compute_capability="8.0"), True),  # A100
        (SimpleNamespace(platform="gpu", compute_capability="9.0"), True),  # H100
        (SimpleNamespace(platform="cpu"), False),
    ],
)
def test_bfloat16_only_where_its_matmuls_are_fast(device, fast):
    assert accelerator._bfloat16_is_fast(device) is fast


@pytest.mark.parametrize("preset", [tiny.get_config, lambda: hf_preset.get_config(None)])
def test_suit_sets_the_compute_dtype_and_keeps_float32_parameters(preset):
    config = preset()
    tpu = accelerator.Accelerator("tpu", "TPU v5 lite", 1, 15.75, True)
    suited = accelerator.suit(config, tpu)
    assert (suited.model.dtype, suited.model.param_dtype) == ("bfloat16", "float32")
    assert dataclasses.replace(suited, model=config.model) == config  # nothing else moves
    assert accelerator.suit(config, dataclasses.replace(tpu, bfloat16=False)) == config
    assert "15.8 GiB each; bfloat16 compute" in str(tpu)


def test_peak_memory_is_this_process_resident_size():
    # On CPU it is the peak RSS; this process has imported JAX, which alone takes > 50 MiB.
    assert 0.05 < accelerator.peak_memory_gib() < 24


def test_inline_images_embeds_the_run_dirs_pngs_only(tmp_path):
    png = b"\x89PNG\r\n\x1a\nfake"
    (tmp_path / "curve_kl.png").write_bytes(png)
    text = "# r\n![kl](curve_kl.png) and ![gone](missing.png) and ![web](https://x/y.png)\n"
    out = report.inline_images(text, tmp_path)
    assert f"![kl](data:image/png;base64,{base64.b64encode(png).decode()})" in out
    assert "![gone](missing.png)" in out and "![web](https://x/y.png)" in out


def test_compilation_cache_stays_off_on_a_fake_multi_device_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_JAX_COMPILATION_CACHE", str(tmp_path / "xla"))
    assert len(jax.local_devices()) == 8  # the test session's fake mesh
    assert accelerator.enable_compilation_cache() is None
    assert not (tmp_path / "xla").exists()
    monkeypatch.setenv("RLHF_JAX_COMPILATION_CACHE", "off")
    assert accelerator.enable_compilation_cache() is None
