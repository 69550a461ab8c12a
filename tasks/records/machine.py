"""The machine as probed: one frozen profile that every later decision reads instead of asking torch."""

from __future__ import annotations

from pydantic import Field

from lora_prep.tasks.records.base import Record


class CudaDevice(Record):
    index: int
    name: str
    capability: str = Field(description='Compute capability "major.minor", e.g. "8.0" for A100, "7.5" for T4.')
    total_memory_bytes: int
    free_memory_bytes: int = Field(description="Free device memory when probed (torch.cuda.mem_get_info), all processes counted.")
    bf16: bool = Field(description="Native bfloat16 (compute capability >= 8.0).")

    @property
    def capability_tuple(self) -> tuple[int, int]:
        major, _, minor = self.capability.partition(".")
        return int(major), int(minor or 0)


class PackageCheck(Record):
    """Whether an optional package is there and actually imports (a broken CUDA build often does not)."""

    installed: bool = False
    importable: bool = False
    version: str | None = None
    error: str | None = Field(default=None, description="First line of the import error, when installed but not importable.")


class KbitBackend(Record):
    """What bitsandbytes does on one kind of device, asked of bitsandbytes itself (a tiny quantize/dequantize)."""

    device: str = Field(description='The device kind tried: "cpu", "cuda", "mps", ...')
    four_bit: bool = Field(description="NF4 quantize + dequantize ran and gave back the tensor.")
    eight_bit: bool = Field(description="LLM.int8 row-wise quantize + dequantize ran and gave back the tensor.")
    reason: str | None = Field(default=None, description="bitsandbytes' own words when a mode does not run there.")


class HardwareProfile(Record):
    cpu_count: int = Field(ge=1, description="CPU cores this process may use (affinity mask), not the host's total.")
    cpu_bf16_native: bool = Field(default=False, description="CPU has bfloat16 instructions (AMX-BF16 / AVX512-BF16 on x86, bf16 on Arm).")
    ram_total_bytes: int = Field(ge=0, description="RAM, capped by the cgroup (container) limit where there is one.")
    ram_available_bytes: int = Field(ge=0, description="RAM available without swapping, capped by the cgroup limit.")
    disk_free_bytes: int = Field(ge=0, description="Free disk at cache_dir, or at its nearest existing parent.")
    cache_dir: str = Field(
        default="",
        description="Hugging Face hub cache directory the disk figure refers to (empty in an artifact's manifest: a path of the preparing machine).",
    )
    torch_version: str | None = None
    cuda_available: bool = False
    cuda_devices: list[CudaDevice] = Field(default_factory=list)
    mps_available: bool = False
    flash_attn: PackageCheck = Field(default_factory=PackageCheck)
    bitsandbytes: PackageCheck = Field(default_factory=PackageCheck)
    kbit: list[KbitBackend] | None = Field(
        default=None,
        description="bitsandbytes' 4/8-bit support per device kind of this machine; None when not asked (no k-bit load planned).",
    )
    accelerate_max_memory: dict[str, int] = Field(
        default_factory=dict, description='accelerate.utils.get_max_memory(): {"0": bytes, "cpu": bytes}, keys as strings.'
    )
    platform: str = ""
    python: str = ""
