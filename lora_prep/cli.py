"""`lora-prep`: prepare | plan | probe | load | log | serve.

Exit codes: 0 success; 2 invalid input or a refusal (the message says what to
change); 1 any other failure. Errors are one line on stderr; `--debug` adds the
traceback. Heavy imports (torch, transformers, prefect) happen after argument
parsing, so `--help` and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import traceback
from typing import Any, Callable

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2


class UsageError(Exception):
    """Bad command-line syntax (as opposed to a bad value, which pydantic reports)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage + error
        raise UsageError(f"{message} (see 'lora-prep {self.prog.split()[-1]} --help')")


# --- options ----------------------------------------------------------------


def _settings_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_id", help="Hugging Face Hub model id, e.g. meta-llama/Llama-3.2-1B")
    p.add_argument("--revision", default="main", help="branch, tag or full commit sha (default: main)")
    g = p.add_argument_group("source")
    g.add_argument("--cache-dir", help="Hugging Face cache directory (default: HF_HUB_CACHE / HF_HOME)")
    g.add_argument("--offline", action="store_true", help="use only the local cache")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle (*.bin) weights; pickle can run code")
    g.add_argument("--token-secret", help="name of a Prefect Secret block holding the HF token (default: HF_TOKEN)")
    g = p.add_argument_group("load")
    g.add_argument("--dtype", help="auto | bfloat16 | float16 | float32")
    g.add_argument("--attn", dest="attn_implementation", help="auto | flash_attention_2 | sdpa | eager")
    g.add_argument("--device-map", help='auto | cpu | cuda | cuda:N | mps | JSON dict')
    g.add_argument("--quantization", help="none | 4bit | 8bit (CUDA + bitsandbytes)")
    g.add_argument("--max-memory", help="per-device budget, e.g. cpu=20GiB,0=70GiB")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None)
    g.add_argument("--trust-remote-code", action="store_true", default=None, help="allow the repo's own code (needs --revision <full sha>)")
    g = p.add_argument_group("lora")
    g.add_argument("--r", type=int, help="LoRA rank (default 16)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 32)")
    g.add_argument("--dropout", type=float, help="LoRA dropout (default 0.05)")
    g.add_argument("--target-modules", help="all-linear | attention | mlp | comma-separated names | regex")
    g.add_argument("--exclude-modules", help="comma-separated module names")
    g.add_argument("--modules-to-save", help="comma-separated module names trained in full")
    g.add_argument("--init-lora-weights", help="true | false | gaussian | pissa | olora | orthogonal")
    g.add_argument("--use-rslora", action="store_true", default=None)
    g.add_argument("--use-dora", action="store_true", default=None)
    g.add_argument("--bias", help="none | all | lora_only")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("tracking and output")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the per-user SQLite store)")
    g.add_argument("--experiment", help="MLflow experiment (default lora-prep)")
    g.add_argument("--register-as", help="register in the MLflow Model Registry under this name")
    g.add_argument("--alias", help="alias for the registered version")
    g.add_argument("--output-dir", help="parent directory of the artifact (default: ~/.local/share/lora-prep/artifacts)")
    g.add_argument("--name", help="artifact directory name (default: <org>--<name>--<sha12>--<time>)")


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def _json_or(value: str | None, fallback: Callable[[str], Any]):
    if value is None:
        return None
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{value!r} is not valid JSON ({exc.msg})") from None
    return fallback(value)


def _max_memory(value: str) -> dict[str, str]:
    out = {}
    for part in _csv(value) or []:
        device, sep, amount = part.partition("=")
        if not sep:
            raise UsageError(f"--max-memory entry {part!r} is not DEVICE=SIZE; use e.g. cpu=20GiB,0=70GiB")
        out[device.strip()] = amount.strip()
    return out


def _targets(value: str | None):
    if value is None or value in ("all-linear", "attention", "mlp"):
        return value
    return _csv(value) if "," in value else value


def _init(value: str | None):
    if value is None:
        return None
    return {"true": True, "false": False}.get(value.lower(), value)


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """All settings models, validated together: every bad field is reported in one line."""
    from pydantic import ValidationError

    from lora_prep.tasks.errors import InvalidInput
    from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings, SourceSettings, TrackingSettings

    raw = {
        "source": (SourceSettings, _drop_none(dict(cache_dir=args.cache_dir, offline=args.offline or None, allow_pickle=args.allow_pickle or None, token_secret=args.token_secret))),
        "load": (LoadSettings, _drop_none(dict(
            dtype=args.dtype, attn_implementation=args.attn_implementation, quantization=args.quantization,
            device_map=_json_or(args.device_map, str), max_memory=_json_or(args.max_memory, _max_memory),
            gradient_checkpointing=args.gradient_checkpointing, trust_remote_code=args.trust_remote_code,
        ))),
        "lora": (LoraSettings, _drop_none(dict(
            r=args.r, alpha=args.alpha, dropout=args.dropout, bias=args.bias, target_modules=_targets(args.target_modules),
            exclude_modules=_csv(args.exclude_modules), modules_to_save=_csv(args.modules_to_save),
            init_lora_weights=_init(args.init_lora_weights), use_rslora=args.use_rslora, use_dora=args.use_dora, seed=args.seed,
        ))),
        "tracking": (TrackingSettings, _drop_none(dict(tracking_uri=args.tracking_uri, experiment=args.experiment, register_as=args.register_as, alias=args.alias))),
        "output": (OutputSettings, _drop_none(dict(output_dir=args.output_dir, name=args.name))),
    }
    settings, problems = {}, []
    for section, (model, values) in raw.items():
        try:
            settings[section] = model(**values)
        except ValidationError as exc:
            problems += [_field_problem(section, err) for err in exc.errors()]
    if problems:
        raise InvalidInput("invalid settings: " + "; ".join(problems))
    return settings


def _field_problem(section: str, err: dict) -> str:
    field = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")) and p not in ("str", "list[str]", "bool", "int"))
    where = f"{section}.{field}" if field else section
    message = err["msg"].removeprefix("Value error, ").rstrip(".")
    value = err.get("input")
    shown = "" if isinstance(value, dict) or message.endswith(".") and repr(value) in message else f" (got {value!r})"
    return f"{where}: {message}{shown}"


# --- commands -----------------------------------------------------------------


def _warm_prefect() -> threading.Thread | None:
    """Start Prefect's ephemeral API server while torch and transformers import (it takes seconds)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    thread = threading.Thread(target=SubprocessASGIServer().start, name="prefect-warmup", daemon=True)
    thread.start()
    return thread


class _OnlyWarnings(logging.Filter):
    """Console only: of Prefect's own records keep the warnings. Its INFO lines (run started,
    "Finished in state Failed(<the error again>)") and ERROR lines (tracebacks) would repeat what
    the CLI says in its summary or its one error line. The Prefect UI still gets them all;
    --debug shows them here too. Download progress bars are not log records and stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("prefect") or record.levelno == logging.WARNING


def _quiet_console(debug: bool) -> None:
    if debug:
        return
    from prefect.logging import configuration
    from prefect.logging.handlers import PrefectConsoleHandler

    if not configuration.PROCESS_LOGGING_CONFIG:
        configuration.setup_logging()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(_OnlyWarnings())


def cmd_prepare(args) -> int:
    import warnings

    # PEFT calls a transformers 5 property deprecated in favour of is_activation_checkpointing;
    # the warning is PEFT's to fix and tells a CLI user nothing.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    settings = settings_from_args(args)
    warm = _warm_prefect()
    from lora_prep.flows.prepare_model import prepare_model  # imports torch, transformers, peft

    _quiet_console(args.debug)

    if warm is not None:
        warm.join(timeout=120)
    result = prepare_model(model_id=args.model_id, revision=args.revision, **settings)
    if args.json:
        print(result.model_dump_json())
        return EXIT_OK
    from lora_prep.tasks.tracking import ui_command

    lines = [
        f"artifact   {result.artifact_dir}",
        f"model      {result.repo_id} @ {result.commit_sha} (requested {result.revision})",
        f"targets    {len(result.target_modules)} layers: {', '.join(sorted({t.rsplit('.', 1)[-1] for t in result.target_modules}))}",
        f"params     {result.total_params:,} total, {result.trainable_params:,} trainable",
        f"download   {result.bytes_downloaded:,} bytes{' (cache)' if result.from_cache else ''}{' (offline)' if result.offline else ''}",
        f"mlflow     run {result.mlflow_run_id} at {result.mlflow_tracking_uri}",
    ]
    if result.model_uri:
        lines.append(f"registered {result.model_uri}")
    ui = ui_command(result.mlflow_tracking_uri)
    lines.append(f"open       {ui}" if ui else f"open       {result.mlflow_run_url}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_plan(args) -> int:
    settings = settings_from_args(args)
    from lora_prep.dry_run import dry_run, format_dry_run

    report = dry_run(args.model_id, args.revision, settings["source"], settings["load"], settings["lora"])
    print(json.dumps(report) if args.json else format_dry_run(report))
    return EXIT_OK if report["fits"] else EXIT_INVALID


def cmd_probe(args) -> int:
    from lora_prep.tasks.hardware import format_profile, probe_hardware

    profile = probe_hardware(args.cache_dir)
    print(profile.model_dump_json() if args.json else format_profile(profile))
    return EXIT_OK


def cmd_load(args) -> int:
    from lora_prep.tasks.artifact_load import load_adapter_ready

    from lora_prep.tasks.settings import SourceSettings

    source = SourceSettings(**_drop_none(dict(cache_dir=args.cache_dir, offline=args.offline or None, allow_pickle=args.allow_pickle or None)))
    loaded = load_adapter_ready(args.ref, trainable=args.trainable, tracking_uri=args.tracking_uri, source=source, trust_remote_code=args.trust_remote_code)
    summary = loaded.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print("\n".join(f"{k:<18} {v}" for k, v in summary.items()))
    return EXIT_OK


def cmd_log(args) -> int:
    from pathlib import Path

    from lora_prep.tasks.settings import TrackingSettings
    from lora_prep.tasks.tracking import log_artifact_run

    tracking = TrackingSettings(**_drop_none(dict(tracking_uri=args.tracking_uri, experiment=args.experiment, register_as=args.register_as, alias=args.alias)))
    result = log_artifact_run(Path(args.artifact_dir), tracking, {"lora_prep.logged_by": "lora-prep log"}, {})
    print(result.model_dump_json() if args.json else f"logged {args.artifact_dir} as MLflow run {result.run_id} at {result.tracking_uri}")
    return EXIT_OK


def cmd_serve(args) -> int:
    from lora_prep.deployments.serve import serve_all

    serve_all()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-prep", description="Prepare Hugging Face models for LoRA fine-tuning, tracked in MLflow, orchestrated by Prefect.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="run the prepare flow: download, plan, load, wrap with LoRA, save, log to MLflow")
    _settings_options(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("plan", help="dry run: what prepare would fetch and how it would load, without downloading weights")
    _settings_options(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("probe", help="show what this machine can do")
    p.add_argument("--cache-dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("load", help="load an artifact (directory, runs:/ or models:/ URI) back and describe it")
    p.add_argument("ref", help="artifact directory, runs:/<run id>[/artifact] or models:/<name>@<alias>")
    p.add_argument("--trainable", action="store_true", help="load the adapter trainable")
    p.add_argument("--tracking-uri")
    p.add_argument("--cache-dir", help="Hugging Face cache directory for the base model")
    p.add_argument("--offline", action="store_true", help="use only the local cache")
    p.add_argument("--allow-pickle", action="store_true", help="the base has only pickle weights and you allow them")
    p.add_argument("--trust-remote-code", action="store_true", help="the base runs its own code and you allow it")
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("log", help="log an existing artifact directory to MLflow (e.g. after MLflow was unreachable)")
    p.add_argument("artifact_dir")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment")
    p.add_argument("--register-as")
    p.add_argument("--alias")
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("serve", help="serve the prepare and training deployments from this process (no work pool)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.debug = debug
        return args.func(args)
    except UsageError as exc:
        print(f"lora-prep: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("lora-prep: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # the top of the program: map every error to an exit code
        if isinstance(exc, SystemExit):
            raise
        from pydantic import ValidationError

        if debug:
            traceback.print_exc()
        if isinstance(exc, ValidationError):
            print(f"lora-prep: error: invalid parameters: {_one_line(exc)}", file=sys.stderr)
            return EXIT_INVALID
        code = getattr(exc, "exit_code", EXIT_FAILURE)
        prefix = "" if hasattr(exc, "exit_code") else f"{type(exc).__name__}: "
        print(f"lora-prep: error: {prefix}{_one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
