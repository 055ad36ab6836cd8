"""train.precision=auto: bf16 only where the device computes it natively (capabilities mocked
both ways), and a warning for an explicit bf16 where it is emulated."""
import pytest
import torch

from tbps.trainer.running import precision

SAPPHIRE_RAPIDS = {"architecture": "x86_64", "cpu_name": "Intel Xeon", "avx2": True,
                   "avx512_bw": True, "avx512_bf16": True, "amx_bf16": True}
CASCADE_LAKE = {"architecture": "x86_64", "cpu_name": "Intel Xeon", "avx2": True,
                "avx512_bw": True, "avx512_bf16": False, "amx_bf16": False}
EPYC_AVX2 = {"architecture": "x86_64", "cpu_name": "AMD EPYC", "avx2": True}


def _cpu(monkeypatch, caps: dict, onednn: bool) -> None:
    monkeypatch.setattr(precision, "_cpu_capabilities", lambda: dict(caps))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn,
                        raising=False)


@pytest.mark.parametrize("caps, onednn, want", [
    (SAPPHIRE_RAPIDS, True, "bf16"),
    (CASCADE_LAKE, True, "fp32"),        # oneDNN takes bf16 there, but emulates it
    (EPYC_AVX2, False, "fp32"),          # the scalar fallback: 20-30x slower than fp32
    (SAPPHIRE_RAPIDS, False, "fp32"),    # a torch built without oneDNN bf16
])
def test_auto_on_cpus(monkeypatch, caps, onednn, want):
    _cpu(monkeypatch, caps, onednn)
    choice = precision.resolve("auto", device_type="cpu")
    assert choice.precision == want and choice.warning is None
    assert choice.reason.startswith(f"auto: {want}") and caps["cpu_name"] in choice.reason


def test_explicit_bf16_on_a_cpu_without_it_warns(monkeypatch):
    _cpu(monkeypatch, EPYC_AVX2, False)
    choice = precision.resolve("bf16", device_type="cpu")
    assert choice.precision == "bf16"
    assert "20-30x slower" in choice.warning and "auto picks fp32" in choice.warning
    assert precision.resolve("fp32", device_type="cpu").warning is None
    _cpu(monkeypatch, SAPPHIRE_RAPIDS, True)
    assert precision.resolve("bf16", device_type="cpu").warning is None


@pytest.mark.parametrize("native, capability, want", [(True, (9, 0), "bf16"),
                                                      (False, (7, 0), "fp32")])
def test_auto_on_gpus(monkeypatch, native, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **k: native)
    choice = precision.resolve("auto", device_type="cuda")
    assert choice.precision == want
    assert f"compute capability {capability[0]}.{capability[1]}" in choice.reason


def test_this_machine_gives_an_answer():
    native, what = precision.cpu_bf16()
    assert isinstance(native, bool) and "oneDNN" in what
