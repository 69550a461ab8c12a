"""Stage 3, plan: everything decided before a weight moves, and every bad input refused here.

1. the model's skeleton (empty weights, from config.json): its parameters counted by how a load stores
   them (tasks/model/census.py: what bitsandbytes quantizes and what it leaves in the compute dtype);
2. the LoRA targets on that skeleton (tasks/lora/targets.py): exact module and expert-parameter names,
   exclusions with reasons, dropout, trainable parameters;
3. the load plan (tasks/model/load_plan.py): dtype, attention, placement, quantization (with the
   BitsAndBytesConfig every consumer rebuilds), the memory estimate by class, fit;
4. the artifact's parent directory (a directory that can be created and written) and the tracking URI.

The problems of all of them are reported together, in one error. A model that does not fit is
refused after the settings are known to be valid (a capacity refusal, with numbers).
The work is ``lora_prep.tasks.preflight.plan_prepare``; this module only makes it a task.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from lora_prep.tasks.preflight import plan_prepare

__all__ = ["plan", "plan_prepare"]

# No cache: a plan is cheap and must follow the profile measured now. No retries: a refusal is final.
plan = task(name="plan", cache_policy=NO_CACHE, retries=0, timeout_seconds=300)(plan_prepare)
