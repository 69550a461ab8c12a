"""How a preparation reads, in one place: the rows every view shows, and the two ways they are printed.

``lora-prep prepare`` and ``lora-prep plan`` print rows as aligned text; the Prefect run's markdown
artifact and the model card print them as a markdown table. Rows are built from records only (the
dry run's ``PlanReport``, an artifact's ``Manifest``, the flow's ``PreparedModel``), and each fact has
one row builder here, so no view formats a fact its own way.
"""

from __future__ import annotations

from lora_prep.tasks.common.units import format_bytes
from lora_prep.tasks.records.manifest import Manifest
from lora_prep.tasks.records.plan import LoadPlan, PlanReport, TargetPlan
from lora_prep.tasks.records.results import PreparedModel
from lora_prep.tasks.settings import LoraSettings

Row = tuple[str, str]
LABEL_WIDTH = 11  # "registered " is the longest label
_EXCLUDED_SHOWN = 6  # left-out modules listed before "... and N more"


# --- one row builder per fact -----------------------------------------------------------------------


def pin_of(commit_sha: str | None, content_digest: str | None) -> str:
    """What names the exact base files: the commit, or for a local directory its content digest."""
    return commit_sha or (f"content digest {content_digest}" if content_digest else "local directory")


def model_row(name: str, pin: str, revision: str) -> Row:
    return "model", f"{name} @ {pin} (requested {revision})"


def load_row(plan: LoadPlan) -> Row:
    quant = "" if plan.quantization == "none" else f", {plan.quantization} bitsandbytes"
    return "load", f"{plan.dtype}{quant}, {plan.attn_implementation} attention, on {plan.device_map}"


def memory_row(plan: LoadPlan) -> Row:
    need = plan.estimate_bytes + plan.overhead_bytes
    return "memory", (
        f"needs {format_bytes(need)} ({format_bytes(plan.estimate_bytes)} model + {format_bytes(plan.overhead_bytes)} margin) "
        f"of {format_bytes(plan.available_bytes)} available"
    )


def memory_part_rows(plan: LoadPlan) -> list[Row]:
    """The estimate by class: what a k-bit load quantizes, and what stays in the compute dtype and why."""
    return [
        ("", f"{part.name}: {part.params:,} parameters as {part.stored_as}, {format_bytes(part.bytes)}")
        if part.params
        else ("", f"{part.name}: {format_bytes(part.bytes)}")
        for part in plan.memory
    ]


def lora_rows(settings: LoraSettings, targets: TargetPlan) -> list[Row]:
    rows = [
        (
            "lora",
            f"r={settings.r} alpha={settings.alpha} dropout={targets.dropout} on {len(targets.target_modules)} modules: "
            f"{', '.join(targets.module_leaves)}",
        )
    ]
    if targets.target_parameters:
        rows.append(
            (
                "experts",
                f"{len(targets.target_parameters)} fused expert parameters: {', '.join(targets.expert_parameter_leaves)} "
                f"(dropout {targets.dropout_reason})",
            )
        )
    rows += [("left out", f"{name}: {why}") for name, why in list(targets.excluded.items())[:_EXCLUDED_SHOWN]]
    if len(targets.excluded) > _EXCLUDED_SHOWN:
        rows.append(("left out", f"... and {len(targets.excluded) - _EXCLUDED_SHOWN} more (see --json)"))
    return rows


def params_row(total: int | None, trainable: int | None) -> Row:
    if total is None or trainable is None:
        return "trainable", "unknown (the model's skeleton could not be built)"
    return "trainable", f"{trainable:,} of {total:,} parameters ({100.0 * trainable / max(total, 1):.3f}%)"


def reason_rows(plan: LoadPlan) -> list[Row]:
    return [("plan", f"{decision:<14} {why}") for decision, why in plan.reasons.items()]


# --- the views -----------------------------------------------------------------------------------------


def plan_rows(report: PlanReport) -> list[Row]:
    """`lora-prep plan`: what prepare would fetch and do, and whether it fits."""
    rows = [
        model_row(report.repo_id, pin_of(report.commit_sha, None), report.revision),
        (
            "files",
            f"{len(report.files)} to use, {report.files_cached} already cached; "
            f"{report.bytes_to_download:,} of {report.bytes_total:,} bytes to download",
        ),
    ]
    rows += [("", f"{'cached ' if f.cached else 'fetch  '} {f.bytes:>14,}  {f.path}") for f in report.files]
    dtypes = ", ".join(f"{k}: {v:,}" for k, v in report.stored_dtypes.items())
    rows.append(("params", f"{report.param_count:,} ({dtypes})" if report.param_count else "unknown (no safetensors headers)"))
    rows += [
        load_row(report.plan),
        memory_row(report.plan),
        *memory_part_rows(report.plan),
        *reason_rows(report.plan),
        *lora_rows(report.lora, report.targets),
        params_row(report.targets.total_params, report.targets.trainable_params),
        ("artifact", f"under {report.artifact_parent}"),
        ("fits", "yes" if report.fits else f"NO: {report.refusal}"),
    ]
    return rows


def manifest_rows(manifest: Manifest) -> list[Row]:
    """An artifact: its base, how it loaded, what got LoRA (the model card and the run summary)."""
    base = manifest.base_model
    return [
        model_row(base.name_or_path, pin_of(base.commit_sha, base.content_digest), base.revision),
        load_row(manifest.load_plan),
        memory_row(manifest.load_plan),
        *memory_part_rows(manifest.load_plan),
        *lora_rows(manifest.lora.settings, manifest.lora.targets),
        params_row(manifest.parameters.total, manifest.parameters.trainable),
    ]


def preparation_rows(result: PreparedModel, manifest: Manifest, open_with: str) -> list[Row]:
    """A finished `lora-prep prepare`: the artifact, then the manifest's rows, then where it was downloaded and logged."""
    cache = " (cache)" if result.from_cache else ""
    offline = " (offline)" if result.offline else ""
    rows = [
        ("artifact", result.artifact_dir),
        *manifest_rows(manifest),
        ("download", f"{result.bytes_downloaded:,} bytes{cache}{offline}"),
        ("mlflow", f"run {result.mlflow_run_id} at {result.mlflow_tracking_uri}"),
    ]
    if result.model_uri:
        rows.append(("registered", result.model_uri))
    rows += [("open", open_with), ("seconds", ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()))]
    return rows


# --- two ways to print rows ---------------------------------------------------------------------------


def as_text(rows: list[Row]) -> str:
    return "\n".join(f"{label:<{LABEL_WIDTH}}{value}".rstrip() if label else f"  {value}" for label, value in rows)


def as_markdown(rows: list[Row]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    body = "\n".join(f"| {cell(label)} | {cell(value)} |" for label, value in rows)
    return f"| | |\n|---|---|\n{body}\n"
