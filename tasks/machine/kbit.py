"""What bitsandbytes can do on this machine's devices, asked of bitsandbytes itself.

bitsandbytes 0.45+ has backends beyond CUDA (its CPU backend ships in the PyPI wheels; MPS, XPU and others
where torch has them), so "can this machine load in 4 or 8 bit" is not ``torch.cuda.is_available()``: the
probe quantizes and dequantizes a small tensor on each device kind the machine has, in both modes, and
keeps bitsandbytes' own words when one fails. Importing bitsandbytes costs ~3 s here (it loads its native
libraries), so the flow asks only when a k-bit load is planned.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from lora_prep.tasks.records.machine import KbitBackend

# A round trip that gives back noise is not support: NF4 keeps the mean absolute error near 10% of the values.
_MAX_RELATIVE_ERROR = 0.25
# bitsandbytes' own loggers with warnings that are about speed, not correctness: its CPU backend says at
# import that the optional `kernels` package (a faster 4-bit gemm fetched from the Hub) is missing, and
# LLM.int8 says on every matmul that it casts the input to float16 (what it always does).
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions")
# Set by the CLI's prepare and plan commands: this process runs one preparation (or one plan) and exits.
_ONE_RUN_PROCESS = False


def one_run_process() -> None:
    """This process prepares or plans one model, then exits (the CLI): keep_bitsandbytes_out may act in it."""
    global _ONE_RUN_PROCESS
    _ONE_RUN_PROCESS = True


def keep_bitsandbytes_out(quantization: str, config: dict[str, Any]) -> bool:
    """In a one-run process whose run loads nothing k-bit, make bitsandbytes unimportable; True when it did.

    PEFT imports bitsandbytes eagerly wherever it is installed (its LoRA layers look for bitsandbytes'
    Linear classes), and that import loads native libraries and torch's compiler stack: about 0.9 s on an
    AVX-512 Xeon and 2 s on an EPYC, in a run that never uses it. Not done in any other process (a
    pipeline that imports lora-prep, a Prefect worker's flow run): PEFT and transformers remember
    "bitsandbytes unavailable", and a later k-bit load there would fail. Not done for a checkpoint whose
    config carries a quantization_config: transformers may need bitsandbytes to read those weights.
    """
    if not _ONE_RUN_PROCESS or quantization != "none" or config.get("quantization_config") or "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # its import now raises ImportError; find_spec says absent
    return True


@contextlib.contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """bitsandbytes' speed notices off for the block (its errors still show)."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def _round_trip(torch: Any, device: str, mode: str) -> str | None:
    """None when ``mode`` quantizes and dequantizes on ``device``; else why not, in bitsandbytes' words."""
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    x = torch.randn(64, 64, dtype=torch.float32).to(device)
    try:
        if mode == "4bit":
            q, state = F.quantize_4bit(x.to(torch.bfloat16), quant_type="nf4")
            y = F.dequantize_4bit(q, state).float()
        else:
            codes, scales, _ = F.int8_vectorwise_quant(x.to(torch.float16))
            y = F.int8_vectorwise_dequant(codes, scales).float()
    except Exception as exc:  # a missing kernel or backend raises NotImplementedError, RuntimeError, ...
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    error = float((x - y).abs().mean() / x.abs().mean())
    return None if error < _MAX_RELATIVE_ERROR else f"the {mode} round trip gave back other values (mean error {error:.0%})"


def probe_kbit(devices: list[str]) -> list[KbitBackend]:
    """bitsandbytes' 4-bit and 8-bit support on each device kind ("cpu", "cuda", "mps", ...). Never raises."""
    import torch

    try:
        with quiet_bitsandbytes():
            import bitsandbytes  # noqa: F401  (its backends register on import)
    except Exception as exc:  # not installed, or a broken native library
        why = f"bitsandbytes does not import ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        return [KbitBackend(device=d, four_bit=False, eight_bit=False, reason=why) for d in devices]
    out = []
    for device in devices:
        four, eight = _round_trip(torch, device, "4bit"), _round_trip(torch, device, "8bit")
        reasons = [f"{mode}: {why}" for mode, why in (("4bit", four), ("8bit", eight)) if why]
        out.append(KbitBackend(device=device, four_bit=four is None, eight_bit=eight is None, reason="; ".join(reasons) or None))
    return out
