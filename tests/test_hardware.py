"""probe_hardware on this machine (CPU or GPU alike), optional-package checks and the human view."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lora_prep.tasks.machine.hardware import (
    check_package,
    format_profile,
    probe_hardware,
)
from lora_prep.tasks.records.machine import CudaDevice, HardwareProfile, PackageCheck


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> HardwareProfile:
    return probe_hardware(cache_dir=str(tmp_path_factory.mktemp("hub")))


def test_probe_on_this_machine_returns_sane_values(profile):
    import torch

    assert profile.cpu_count >= 1
    assert 0 < profile.ram_available_bytes <= profile.ram_total_bytes
    assert profile.disk_free_bytes > 0
    assert profile.torch_version == torch.__version__
    assert profile.cuda_available == torch.cuda.is_available()
    assert len(profile.cuda_devices) == (torch.cuda.device_count() if profile.cuda_available else 0)
    assert "cpu" in profile.accelerate_max_memory
    assert profile.python and profile.platform


def test_missing_cache_dir_is_measured_at_its_nearest_existing_parent_and_not_created(tmp_path):
    missing = tmp_path / "not" / "yet" / "hub"
    p = probe_hardware(cache_dir=str(missing))
    assert p.cache_dir == str(missing) and p.disk_free_bytes > 0
    assert not (tmp_path / "not").exists()


def test_default_cache_dir_is_the_one_huggingface_hub_uses(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_CACHE / HF_HOME / XDG_CACHE_HOME once, at import: its constant is the truth.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert probe_hardware().cache_dir == str(tmp_path / "hub")


def test_profile_round_trips_through_json_and_is_frozen(profile):
    assert HardwareProfile.model_validate_json(profile.model_dump_json()) == profile
    with pytest.raises(ValidationError):  # frozen: pydantic refuses the assignment
        profile.cpu_count = 99


def test_format_profile_mentions_cpu_ram_disk_and_optional_packages(profile):
    text = format_profile(profile)
    for word in ("CPU", "RAM", "disk", "CUDA", "flash-attn", "bitsandbytes", profile.cache_dir):
        assert word in text


def test_format_profile_lists_each_gpu_with_capability_bf16_and_memory():
    gpus = [
        CudaDevice(index=0, name="NVIDIA A100-SXM4-80GB", capability="8.0", total_memory_bytes=80 * 2**30,
                   free_memory_bytes=79 * 2**30, bf16=True),
        CudaDevice(index=1, name="Tesla T4", capability="7.5", total_memory_bytes=16 * 2**30,
                   free_memory_bytes=2**29, bf16=False),
    ]  # fmt: skip
    p = HardwareProfile(
        cpu_count=4, ram_total_bytes=2**34, ram_available_bytes=2**33, disk_free_bytes=2**35, cache_dir="/c",
        cuda_available=True, cuda_devices=gpus,
        bitsandbytes=PackageCheck(installed=True, importable=False, version="0.45.0", error="OSError: no libcudart"),
    )  # fmt: skip
    text = format_profile(p)
    assert "2 device(s)" in text and "8.00 GiB available of 16.00 GiB" in text
    a100 = next(line for line in text.splitlines() if "A100" in line)
    t4 = next(line for line in text.splitlines() if "T4" in line)
    assert "cuda:0" in a100 and "8.0" in a100 and "yes" in a100 and "79.00 GiB" in a100
    assert "cuda:1" in t4 and "7.5" in t4 and " no " in t4 and "512.00 MiB" in t4
    assert "NOT importable (OSError: no libcudart)" in text


def test_absent_optional_package_is_a_result_not_an_error():
    assert check_package("lora_prep_no_such_package", "lora-prep-no-such-package") == PackageCheck()


def test_broken_optional_package_records_its_import_error(tmp_path, monkeypatch):
    pkg = tmp_path / "lora_prep_broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = check_package("lora_prep_broken_pkg", "lora-prep-broken-pkg")
    assert check.installed and not check.importable
    assert check.error == "OSError: libcudart.so.12: cannot open shared object file"


def test_probe_task_never_caches_and_never_retries():
    pytest.importorskip("prefect")
    from prefect.cache_policies import NO_CACHE

    from lora_prep.tasks.probe import probe

    assert probe.name == "probe" and probe.cache_policy == NO_CACHE and probe.retries == 0
