"""Probe the machine once: a frozen, JSON-serializable HardwareProfile.

``probe_hardware`` is the only function in lora-prep that asks torch.cuda or
torch.mps; every decision downstream (``tasks/model/load_plan.py``) reads the profile
instead, so plans can be tested on any machine with a synthetic profile. A
CPU-only profile is a normal result, not an error.

The probe must run on the machine that will load the model (the flow runs all
its tasks in one process, so it does).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import psutil

from lora_prep.tasks.common.units import format_bytes
from lora_prep.tasks.machine.kbit import probe_kbit
from lora_prep.tasks.records.machine import CudaDevice, HardwareProfile, KbitBackend, PackageCheck

# --- the probe (side effects) ------------------------------------------------


def default_cache_dir() -> str:
    """The hub cache huggingface_hub uses (tasks/hub/env.py: its own constants)."""
    from lora_prep.tasks.hub.env import cache_dir_for

    return cache_dir_for()


def _disk_free(path: str) -> int:
    # The cache may not exist yet on a fresh machine: measure where it will be created.
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, usage) in bytes of this container's memory cgroup, or (None, None) when unlimited or unknown.

    psutil reports the host's RAM; inside a container the cgroup limit is what an
    allocation actually hits.
    """
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        # v2 writes "max"; v1 writes a huge number (2**63 rounded to pages) for "no limit".
        if limit_text == "max" or int(limit_text) >= 2**60:
            return None, None
        return int(limit_text), usage
    return None, None


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _cpu_bf16_native() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 "flags", Arm "Features"
            words = set(value.split())
            return bool(words & {"amx_bf16", "avx512_bf16", "bf16"})
    return False


def check_package(module: str, distribution: str, *, try_import: bool = True) -> PackageCheck:
    """Installed? importable? Never raises: a missing or broken optional package is a result.

    try_import=False: installed and its version only (importing bitsandbytes costs seconds; it is
    imported when a k-bit load is planned, by the k-bit probe)."""
    if importlib.util.find_spec(module) is None:
        return PackageCheck()
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if not try_import:
        return PackageCheck(installed=True, importable=False, version=version, error="not imported (no k-bit load asked)")
    try:
        importlib.import_module(module)
    except Exception as exc:  # broken CUDA builds raise ImportError, OSError, RuntimeError...
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return PackageCheck(installed=True, version=version, error=f"{type(exc).__name__}: {first_line}"[:300])
    return PackageCheck(installed=True, importable=True, version=version)


def _cuda_devices(torch: Any) -> list[CudaDevice]:
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        devices.append(
            CudaDevice(
                index=index,
                name=props.name,
                capability=f"{props.major}.{props.minor}",
                total_memory_bytes=int(total),
                free_memory_bytes=int(free),
                bf16=props.major >= 8,  # Ampere and later; earlier cards emulate bf16 slowly or not at all
            )
        )
    return devices


def _accelerate_max_memory() -> dict[str, int]:
    try:
        from accelerate.utils import get_max_memory

        return {str(k): int(v) for k, v in get_max_memory().items()}
    except Exception:  # accelerate absent or a device query failed: the profile still stands
        return {}


def probe_hardware(cache_dir: str | None = None, kbit: bool = True) -> HardwareProfile:
    """Measure this machine now. Imports torch; reads CUDA/MPS state; never raises for a missing device.

    kbit: also ask bitsandbytes what it can do on each device kind here (imports it: seconds; the flow
    asks only when the load is to be 4 or 8 bit)."""
    import torch

    cache_dir = cache_dir or default_cache_dir()
    vm = psutil.virtual_memory()
    ram_total, ram_available = int(vm.total), int(vm.available)
    limit, usage = _cgroup_memory()
    if limit is not None:
        ram_total = min(ram_total, limit)
        ram_available = max(0, min(ram_available, limit - (usage or 0)))

    cuda_available = bool(torch.cuda.is_available())
    mps_backend = getattr(torch.backends, "mps", None)
    mps_available = bool(mps_backend and mps_backend.is_available())
    kinds = ["cpu", *(["cuda"] if cuda_available else []), *(["mps"] if mps_available else [])]
    backends = probe_kbit(kinds) if kbit else None
    bnb = check_package("bitsandbytes", "bitsandbytes", try_import=False)  # probe_kbit imported it (or said why not)
    if backends is not None and bnb.installed:
        failed = next((b.reason for b in backends if b.reason and b.reason.startswith("bitsandbytes does not import")), None)
        bnb = bnb.model_copy(update={"importable": failed is None, "error": failed})
    return HardwareProfile(
        cpu_count=_cpu_count(),
        cpu_bf16_native=_cpu_bf16_native(),
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_available,
        disk_free_bytes=_disk_free(cache_dir),
        cache_dir=str(cache_dir),
        torch_version=torch.__version__,
        cuda_available=cuda_available,
        cuda_devices=_cuda_devices(torch) if cuda_available else [],
        mps_available=mps_available,
        flash_attn=check_package("flash_attn", "flash-attn"),
        bitsandbytes=bnb,
        kbit=backends,
        accelerate_max_memory=_accelerate_max_memory(),
        platform=platform.platform(),
        python=platform.python_version(),
    )


# --- the human view (`lora-prep probe`) --------------------------------------


def _package_line(check: PackageCheck) -> str:
    if not check.installed:
        return "not installed"
    version = check.version or "unknown version"
    return f"{version}, importable" if check.importable else f"{version}, NOT importable ({check.error})"


def _kbit_line(backend: KbitBackend) -> str:
    modes = [m for m, ok in (("4bit", backend.four_bit), ("8bit", backend.eight_bit)) if ok]
    return f"{', '.join(modes) or 'none'}" + (f" ({backend.reason})" if backend.reason else "")


def format_profile(profile: HardwareProfile) -> str:
    rows = [
        ("platform", f"{profile.platform} (Python {profile.python}, torch {profile.torch_version or 'not installed'})"),
        ("CPU", f"{profile.cpu_count} cores, bf16 instructions: {'yes' if profile.cpu_bf16_native else 'no'}"),
        ("RAM", f"{format_bytes(profile.ram_available_bytes)} available of {format_bytes(profile.ram_total_bytes)}"),
        ("disk", f"{format_bytes(profile.disk_free_bytes)} free at {profile.cache_dir}"),
        ("CUDA", f"{len(profile.cuda_devices)} device(s)" if profile.cuda_available else "not available"),
        ("MPS", "available" if profile.mps_available else "not available"),
        ("flash-attn", _package_line(profile.flash_attn)),
        ("bitsandbytes", _package_line(profile.bitsandbytes)),
        *((f"  4/8-bit on {b.device}", _kbit_line(b)) for b in profile.kbit or []),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["Hardware profile"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    if profile.cuda_devices:
        header = ("GPU", "name", "capability", "bf16", "free", "total")
        table = [header] + [
            (
                f"cuda:{d.index}",
                d.name,
                d.capability,
                "yes" if d.bf16 else "no",
                format_bytes(d.free_memory_bytes),
                format_bytes(d.total_memory_bytes),
            )
            for d in profile.cuda_devices
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines.append("")
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines)
