"""Stage 2, probe: the machine as a frozen HardwareProfile (``lora_prep.tasks.machine.hardware``)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from lora_prep.tasks.machine.hardware import probe_hardware

# No cache: the profile must describe the machine now. No retries: a probe
# failure is a broken install, not something waiting fixes.
probe = task(name="probe", cache_policy=NO_CACHE, retries=0, timeout_seconds=120)(probe_hardware)
