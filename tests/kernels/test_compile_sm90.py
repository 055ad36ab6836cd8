"""The compiled path, checked without a GPU: every kernel variant a GPU run launches (the goal's
and training's shapes, every candidate tile configuration, Triton's launch-time specialisation)
compiles for sm_90, and ptxas reports no spills, registers that leave room for the programs per
SM the tiles are meant to share it with, shared memory that fits an H100, and asynchronous copies
feeding the tensor cores in the pipelined similarity kernels."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke      # also in CI's newest-packages job (.ci/smoke): Triton's compiler

ROOT = Path(__file__).resolve().parents[2]
H100_REGISTERS, H100_SHARED = 65536, 232448  # per SM; per program
KERNELS = {"_similarity_stats_kernel", "_similarity_rows_kernel", "_similarity_grad_kernel",
           "_similarity_grad_pos_kernel", "_topk_select_fwd_kernel", "_topk_select_bwd_kernel"}
PIPELINED = {"_similarity_stats_kernel", "_similarity_grad_kernel"}


def programs_per_sm(config: dict) -> int:
    """Programs that must fit on one SM at once: two for tiles up to 64 x 64 (one's epilogue
    overlaps the other's matrix multiply), one for the larger tiles, which trade occupancy for
    fewer bytes per flop."""
    return 2 if config.get("BLOCK_M", 1) * config.get("BLOCK_N", 1) <= 64 * 64 else 1


def test_kernel_variants_compile_for_sm90_without_spills(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "variants.json"
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.compile_sm90", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    variants = json.loads(out.read_text())
    assert {v["kernel"] for v in variants} == KERNELS
    for v in variants:
        name = f'{v["kernel"]} {v["case"]} {v["config"]}'
        config = {k: int(x) for k, x in (kv.split("=") for kv in v["config"].split())}
        threads = 32 * config.get("num_warps", 4)
        assert v["spill_stores"] == v["spill_loads"] == 0, f"{name}: spills"
        assert v["registers"] * threads * programs_per_sm(config) <= H100_REGISTERS, \
            f'{name}: {v["registers"]} registers'
        assert v["shared"] <= H100_SHARED, f'{name}: {v["shared"]} bytes of shared memory'
        if v["kernel"] in PIPELINED:
            assert v["cp_async"] > 0 and v["wgmma"] > 0, f"{name}: no async copies into wgmma"
            # the launch-time specialisation: sizes and row strides divisible by 16
            assert {"D:D", "N:D", "stride_q:D", "stride_k:D"} <= set(v["hints"].split()), name
