"""``precision``: fp32 by default off CUDA (the golden curves), bf16 autocast on CPU when asked, errors before work."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmpipe.model import device as device_mod
from lmpipe.model.device import autocast_for, cpu_bf16_support
from tests.unit.training.test_train import config, losses, run

CPU = torch.device("cpu")


def test_auto_and_fp32_leave_cpu_runs_in_fp32() -> None:
    for precision in ("auto", "fp32"):
        assert isinstance(autocast_for(CPU, precision), contextlib.nullcontext)
    assert isinstance(autocast_for(torch.device("mps"), "auto"), contextlib.nullcontext)


def test_bf16_on_cpu_multiplies_in_bf16() -> None:
    a = torch.ones(4, 4)
    with autocast_for(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (a @ a).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    assert (a @ a).dtype == torch.float32


def test_bad_precision_and_bf16_elsewhere_are_errors_naming_the_field() -> None:
    with pytest.raises(ValueError) as err:
        autocast_for(torch.device("mps"), "bf16", field="finetune.precision")
    assert str(err.value) == ("finetune.precision='bf16': bf16 autocast runs on cuda and cpu, not mps; "
                              "use fp32 or auto")
    with pytest.raises(ValueError) as err:
        autocast_for(CPU, "fp16")
    assert str(err.value) == "precision='fp16': expected auto, fp32 or bf16"


def test_train_refuses_bf16_on_mps_before_building_the_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^pretrain\.precision='bf16': bf16 autocast runs on cuda and cpu, not "
                                         r"mps; use fp32 or auto$"):
        run(tmp_path, config(device="mps", precision="bf16"))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(("amx", "avx512_bf16", "onednn", "expected"), [
    (True, True, True, "amx"),
    (False, True, True, "avx512_bf16"),
    (False, False, True, "onednn"),
    (False, False, False, "none"),
])
def test_cpu_bf16_support_names_the_fastest_path(monkeypatch, amx, avx512_bf16, onednn, expected) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)
    assert cpu_bf16_support() == expected


def test_bf16_on_a_cpu_without_bf16_kernels_warns(monkeypatch, caplog) -> None:
    monkeypatch.setattr(device_mod, "cpu_bf16_support", lambda: "none")
    with caplog.at_level(logging.WARNING, logger="lmpipe.model.device"):
        autocast_for(CPU, "bf16", field="pretrain.precision")
    assert caplog.messages == ["pretrain.precision=bf16 on a CPU without bf16 kernels (no AVX-512, AVX512-BF16 or "
                               "AMX): emulated, expect it slower than fp32"]


def test_bf16_training_on_cpu_keeps_fp32_weights_and_fp32_quality(tmp_path: Path) -> None:
    fp32 = run(tmp_path / "fp32", config())
    bf16 = run(tmp_path / "bf16", config(precision="bf16"))
    assert losses(tmp_path / "bf16") != losses(tmp_path / "fp32")  # autocast did change the arithmetic
    assert losses(tmp_path / "bf16") == pytest.approx(losses(tmp_path / "fp32"), abs=0.05)
    assert bf16.final_val_loss == pytest.approx(fp32.final_val_loss, abs=0.02)
    weights = load_file(bf16.checkpoint / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
