"""FLOP counting and model FLOPs utilisation (MFU).

MFU = (model FLOPs of a step / step time) / the device's peak dense FLOP/s. The model FLOPs come
from :func:`count_flops`: torch's FLOP counter over one step run on a meta-device copy of the
model (litgpt's way: no memory, no time, and on meta SDPA decomposes into counted matmuls,
where on CPU its fused kernel is not counted at all). Attention is counted dense, without causal
halving, as the counter and PaLM's MFU formula do. :func:`far_train_flops` is the same count
written out, to cross-check the counter.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from glotok.models.far import swiglu_hidden

# Peak dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets. Matched
# against torch.cuda.get_device_name() in order: the first key contained in the name wins.
PEAK_TFLOPS_BF16: dict[str, float] = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM; "NVIDIA H100 80GB HBM3"
    "A100": 312.0,
}

# CPUs have no datasheet peak for torch's kernels (it depends on the ISA path, cores, clocks
# and the BLAS in use), so MFU is not reported there; benchmarks may measure a matmul peak.
CPU_PEAK_REASON = ("no peak FLOP/s is known for CPUs (it depends on ISA, cores, clocks and "
                   "BLAS); mfu is null, see matmul_peak_tflops for a measured reference")


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> tuple[Optional[float], str]:
    """(peak FLOP/s or None, the device's name or why there is no peak)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, CPU_PEAK_REASON
    name = torch.cuda.get_device_name(device)
    if dtype not in (torch.bfloat16, torch.float16):
        return None, f"{name}: the peak table lists bf16/fp16 dense only, the step ran in {dtype}"
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12, name
    return None, f"{name} is not in glotok.utils.flops.PEAK_TFLOPS_BF16: add its datasheet peak"


def mfu(flops_per_step: float, seconds_per_step: float, peak: Optional[float]) -> Optional[float]:
    """Achieved / peak FLOP/s, or None where the peak is unknown."""
    if peak is None:
        return None
    return flops_per_step / seconds_per_step / peak


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that ``fn`` runs (forward, backward, whatever it calls), counted by torch.

    Run it on meta tensors: see the module docstring for why.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def far_train_flops(cfg: Any, batch: int, positions: Optional[int] = None) -> int:
    """Analytic FLOPs of one FAR training step (forward + backward = 3x forward).

    cfg: an ARModelConfig; positions: grid positions per sample (default grid_size^2).
    Matmul FLOPs are 2 per multiply-add; embeddings are lookups (0 FLOPs); attention is QK^T
    and AV counted dense.
    """
    n = positions or cfg.grid_size ** 2
    d, f = cfg.dim, swiglu_hidden(cfg.dim, cfg.ffn_multiple_of)
    block = 4 * d * d + 3 * d * f  # wqkv + wo, w1 + w3 + w2
    macs = (cfg.n_layers * block * n  # trunk: class token + n - 1 tokens = n positions
            + 2 * d * d * (n - 1)  # token_proj on the n - 1 input tokens
            + cfg.head_layers * block * 2 * n  # head: 2 sub-steps per position
            + d * (cfg.visual_vocab_size + cfg.semantic_vocab_size) * n)  # the two outputs
    attention = 2 * d * (cfg.n_layers * n * n + cfg.head_layers * n * 2 * 2)  # MACs, dense
    return 3 * 2 * batch * (macs + attention)
