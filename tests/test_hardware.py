"""tagpr.hardware: the CPU probes answer as the machine's own flags say, ATen capped at AVX2 answers as an AVX2-only
CPU, TAGPR_CPU=plain turns every probe off, and both sides of each switch give the same numbers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tagpr import engine, hardware, sampler
from tagpr.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.setenv(hardware.FORCE_ENV, "auto")


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.setenv(hardware.FORCE_ENV, "plain")


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny", device="cpu", dtype=torch.float32, seed=0)[0]


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo to check the probes against")
def test_probes_agree_with_the_cpu_flags(auto):
    """torch's capability checks against Linux's own list of the CPU's flags (an independent source)."""
    flags = cpu_flags()
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default"):
        flags -= {"avx512f", "avx512_bf16", "amx_bf16", "avx512bw"}  # run as an AVX2 CPU: as if absent
    assert hardware.bf16_matmul() == bool({"avx512_bf16", "amx_bf16"} & flags)
    onednn_bf16 = {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    if torch.backends.mkldnn.is_available():
        assert hardware.can_prepack(torch.bfloat16) == onednn_bf16
        assert hardware.can_prepack(torch.float32)  # fp32 prepacking: any x86-64
    want = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    if want:
        assert hardware.describe() == want
    elif "avx512f" not in flags and "avx2" in flags:
        assert hardware.describe() == "AVX2 only"


def test_forced_plain_turns_every_probe_off(plain, lm):
    assert not hardware.bf16_matmul()
    assert not hardware.can_prepack(torch.float32) and not hardware.can_prepack(torch.bfloat16)
    assert not hardware.can_pack_few_rows(torch.float32)
    assert "TAGPR_CPU=plain" in hardware.describe()
    for dtype in (torch.float32, torch.bfloat16):
        w = engine.Weights(lm, dtype, fuse=True)  # default: ask the probe
        assert not w.packed and not w.head.packed and not w.layers[0]["o"].weight.is_mkldnn
        assert not w.few and w.head.plain is None
    # --precision: bf16 on a CPU without bf16 hardware stops with the fix; auto is fp32; CUDA is not asked
    with pytest.raises(
        hardware.PrecisionError,
        match=r"needs a CPU with bf16 matmul hardware \(AVX512-BF16 or "
        r"AMX\); this one: probes forced.*Use --precision fp32",
    ):
        hardware.resolve_precision("bf16", torch.device("cpu"))
    assert hardware.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert hardware.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert hardware.resolve_precision("bf16", torch.device("cuda")) == "bf16"
    with pytest.raises(hardware.PrecisionError, match="must be one of auto, fp32, bf16"):
        hardware.resolve_precision("fp16", torch.device("cpu"))


AVX2_PROBE = """
import torch
from tagpr import hardware
print(torch.backends.cpu.get_cpu_capability(), hardware.describe(), hardware.bf16_matmul(),
      hardware.can_prepack(torch.float32), hardware.can_prepack(torch.bfloat16),
      hardware.can_pack_few_rows(torch.float32), hardware.can_pack_few_rows(torch.bfloat16), sep="|")
try:
    hardware.resolve_precision("bf16", torch.device("cpu"))
except hardware.PrecisionError as e:
    print("refused:", e)
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="not an x86-64 CPU")
def test_a_cpu_capped_at_avx2_answers_as_an_avx2_cpu():
    """ATEN_CPU_CAPABILITY=avx2 (how a larger CPU runs as an AVX2 laptop, with oneDNN and MKL capped too): no bf16
    hardware whatever the flags, bf16 refused before any work, and fp32 weights still prepacked, as on the laptop."""
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        hardware.FORCE_ENV: "auto",
    }
    out = subprocess.run(
        [sys.executable, "-c", AVX2_PROBE], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    onednn, mkl = torch.backends.mkldnn.is_available(), torch.backends.mkl.is_available()
    assert out[0].split("|") == ["AVX2", "AVX2 only", "False", str(onednn), "False", str(mkl), "False"]
    assert (
        out[1].startswith("refused: --precision bf16 needs a CPU with bf16 matmul hardware") and "AVX2 only" in out[1]
    )


def test_the_probe_on_side_where_the_machine_has_it(auto):
    if not hardware.bf16_matmul():
        pytest.skip(f"this CPU has no bf16 matmul hardware ({hardware.describe()}): only the plain side runs here")
    assert hardware.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert hardware.can_prepack(torch.bfloat16)


def test_an_unknown_force_value_is_an_error(monkeypatch):
    monkeypatch.setenv(hardware.FORCE_ENV, "avx9")
    with pytest.raises(ValueError, match="TAGPR_CPU='avx9': expected 'auto' or 'plain'"):
        hardware.bf16_matmul()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plain_and_probed_paths_sample_the_same_tokens(monkeypatch, lm, precision):
    """The sampler with the machine's fast paths (prepacked weights where oneDNN takes them) and with every probe
    forced off: the same tokens, and the same first-step logits (bf16: identical, prepacking changes no rounding;
    fp32: up to summation order). Where the CPU cannot prepack that dtype both runs would take the plain path, so
    the test skips by name; where it runs, the fast run is asserted to have used the prepacked weights."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    monkeypatch.setenv(hardware.FORCE_ENV, "auto")
    if not hardware.can_prepack(dtype):
        pytest.skip(f"oneDNN cannot prepack {precision} weights on this CPU: the two runs would be one path")
    p = [[5, 6, 7, 8, 9], [10, 11]]
    runs = {}
    for mode in ("auto", "plain"):
        monkeypatch.setenv(hardware.FORCE_ENV, mode)
        assert engine.Weights(lm, dtype, True).packed == (mode == "auto")  # the capability really used, or not
        g = [torch.Generator().manual_seed(i) for i in range(6)]
        r = sampler.generate(
            lm, p, eos_id=-1, pad_id=0, max_new_tokens=8, generator=g, n_per_prompt=3, precision=precision
        )
        ids = torch.tensor([[0] * 3 + p[0], [0] * 6 + p[1]])
        mask = (ids != 0).long()
        with torch.no_grad():
            logits, _, _ = engine.prefill(
                lm, engine.Weights(lm, dtype, True), ids, mask, (mask.cumsum(1) - 1).clamp(min=0)
            )
        runs[mode] = (r.response_ids, logits.float())
    assert torch.equal(runs["auto"][0], runs["plain"][0])
    if precision == "bf16":
        assert torch.equal(runs["auto"][1], runs["plain"][1])
    else:
        torch.testing.assert_close(runs["auto"][1], runs["plain"][1], atol=1e-5, rtol=1e-5)
