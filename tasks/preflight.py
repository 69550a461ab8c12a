"""The plan stage's work as a plain function: skeleton, census, LoRA targets, load plan, output and tracking checks.

It imports no Prefect: ``lora-prep plan`` runs it in-process (resolve, probe, plan) and never starts the flow
engine, so a dry run pays only for what it uses (transformers for the skeleton, PEFT for the targets).
The plan task (tasks/plan.py) wraps it for the flow.
"""

from __future__ import annotations

from pathlib import Path

from lora_prep.tasks.artifact.write import check_output_dir
from lora_prep.tasks.errors import (
    DoesNotFit,
    InvalidInput,
    LoraPrepError,
    RemoteCodeRefused,
)
from lora_prep.tasks.hub.selection import ships_code
from lora_prep.tasks.lora.targets import plan_targets
from lora_prep.tasks.machine.kbit import keep_bitsandbytes_out
from lora_prep.tasks.model.anatomy import skeleton
from lora_prep.tasks.model.census import parameter_census
from lora_prep.tasks.model.facts import ModelFacts
from lora_prep.tasks.model.load_plan import plan_for_repo
from lora_prep.tasks.model.quantization import bnb_config_dict
from lora_prep.tasks.model.rules import remote_code_trusted
from lora_prep.tasks.records.hub import RepoFacts
from lora_prep.tasks.records.machine import HardwareProfile
from lora_prep.tasks.records.plan import LoadPlan, ParameterCensus, Plan
from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings, SourceSettings, TrackingSettings
from lora_prep.tasks.tracking.store import check_tracking_uri, resolve_tracking_uri


def _code_dir(facts: RepoFacts, source: SourceSettings) -> str:
    """A directory holding config.json and the repo's *.py files, to build a trusted remote-code skeleton."""
    if facts.is_local:
        return facts.repo_id
    from huggingface_hub import hf_hub_download

    from lora_prep.tasks.hub.cache import guarded_hub
    from lora_prep.tasks.hub.env import cache_dir_for, get_token
    from lora_prep.tasks.hub.errors import hub_errors

    code = ["config.json", *[p for p in facts.selected if p.endswith(".py")]]
    path = None
    for name in code:  # small files; the download stage finds them cached
        with guarded_hub(), hub_errors(facts.repo_id, facts.revision, name):
            path = hf_hub_download(
                facts.repo_id,
                name,
                revision=facts.commit_sha,
                cache_dir=cache_dir_for(source),
                token=get_token(source),
                local_files_only=facts.offline,
            )
    assert path is not None  # code lists config.json: the loop ran
    return str(Path(path).parent)


def plan_prepare(
    profile: HardwareProfile,
    facts: RepoFacts,
    load: LoadSettings,
    lora: LoraSettings,
    output: OutputSettings,
    revision: str,
    source: SourceSettings = SourceSettings(),
    tracking: TrackingSettings = TrackingSettings(),
    *,
    enforce_fit: bool = True,
    create_output: bool = True,
) -> Plan:
    """The load plan, the LoRA targets, the output directory and the tracking store, or one error listing every problem.

    enforce_fit=False (the dry run) returns a plan with ``fits=False`` instead of refusing;
    create_output=False checks the output directory without creating it.
    """
    keep_bitsandbytes_out(load.quantization, facts.config)  # before PEFT's first import, in the CLI's process only
    problems: list[LoraPrepError] = []
    load_plan: LoadPlan | None = None
    census: ParameterCensus | None = None
    targets = None
    trusted = remote_code_trusted(ModelFacts.from_repo_facts(facts, look_up_attention=False), load, revision)
    if not ships_code(facts.config) or trusted:  # a skeleton of remote code only once the plan trusts it
        try:
            code_dir = _code_dir(facts, source) if trusted else None
            model = skeleton(facts.config, model_dir=code_dir, trust_remote_code=trusted)
            census = parameter_census(model)  # before PEFT wraps the skeleton: its LoRA layers are not the model's
            targets = plan_targets(model, lora)
            census = census.model_copy(update={"adapter_params": targets.trainable_params or 0})
        except LoraPrepError as exc:
            problems.append(exc)
    try:
        load_plan = plan_for_repo(profile, facts, load, revision, census=census, enforce_fit=False)
        load_plan = load_plan.model_copy(update={"quantization_config": bnb_config_dict(load_plan.quantization, load_plan.dtype)})
    except LoraPrepError as exc:
        problems.append(exc)
    try:
        parent = check_output_dir(output, create=create_output)
    except LoraPrepError as exc:
        problems.append(exc)
    try:
        check_tracking_uri(resolve_tracking_uri(tracking))  # MLFLOW_TRACKING_URI too: the flow parameter is checked when set
    except LoraPrepError as exc:
        problems.append(exc)
    if problems:
        if len(problems) == 1:
            raise problems[0]
        kind = RemoteCodeRefused if any(isinstance(p, RemoteCodeRefused) for p in problems) else InvalidInput
        raise kind("; ".join(str(p).rstrip(".") for p in problems) + ".")
    # No problem: plan_for_repo returned, and the skeleton was built (remote code it did not trust is refused by the load plan).
    assert load_plan is not None and targets is not None
    if enforce_fit and not load_plan.fits:
        raise DoesNotFit(
            load_plan.reasons["fit"].removeprefix("does not fit: "),
            repo_id=facts.repo_id,
            needed_bytes=load_plan.estimate_bytes + load_plan.overhead_bytes,
            available_bytes=load_plan.available_bytes,
        )
    return Plan(load=load_plan, targets=targets, artifact_parent=str(parent))
