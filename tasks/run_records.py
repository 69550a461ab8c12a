"""What a preparation's MLflow run records, from its manifest: params, metrics, tags as MLflow entities."""

from __future__ import annotations

import time
from typing import Any

from lora_prep.tasks.manifest import Manifest

_PARAM_MAX = 6000  # MLflow's cap on a param value, in characters


def clip(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = value if isinstance(value, str) else str(value)
        out[key] = text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 20] + "...(see manifest)"
    return out


def manifest_params(manifest: Manifest) -> dict[str, str]:
    base, plan, used, lora = manifest.base_model, manifest.load_plan, manifest.load_used, manifest.lora
    t = lora.targets
    params: dict[str, Any] = {
        "model_id": base.name_or_path, "source": base.source, "revision": base.revision, "commit_sha": base.commit_sha or "",
        "content_digest": base.content_digest, "offline": base.offline,
    }
    for key in ("dtype", "attn_implementation", "device_map", "quantization", "max_memory", "gradient_checkpointing", "trust_remote_code"):
        params[f"plan.{key}"] = getattr(plan, key)
    for key, value in used.model_dump(mode="json").items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            params[f"plan.used.{key}"] = value
    for key, value in lora.settings.model_dump(mode="json").items():
        params[f"lora.{key}"] = value
    params.update({
        "lora.dropout": t.dropout, "lora.dropout_reason": t.dropout_reason,
        "lora.target_modules": sorted({m.rsplit(".", 1)[-1] for m in t.target_modules}),
        "lora.target_modules_count": len(t.target_modules),
        "lora.target_parameters": t.expert_parameter_leaves, "lora.target_parameters_count": len(t.target_parameters),
        "lora.excluded_count": len(t.excluded),
    })
    return clip(params)


def manifest_metrics(manifest: Manifest, run_stats: dict[str, float]) -> dict[str, float]:
    metrics = {"total_params": float(manifest.parameters.total), "trainable_params": float(manifest.parameters.trainable)}
    if manifest.check.forward:
        metrics["check.seconds"] = manifest.check.seconds
        if manifest.check.loss is not None:
            metrics["check.loss"] = manifest.check.loss
    metrics.update({k: float(v) for k, v in run_stats.items() if v is not None})
    return metrics


def param(key, value):
    from mlflow.entities import Param

    return Param(key, value)


def tag(key, value):
    from mlflow.entities import RunTag

    return RunTag(key, str(value))


def metric(key, value):
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)
