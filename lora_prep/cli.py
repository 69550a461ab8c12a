"""`lora-prep`: prepare | plan | probe | load | log | doctor | server | serve.

Exit codes (tasks/errors.py ``exit_code``): 0 success; 2 invalid input, not found, a refusal
or a bad repo (the message says what to change); 1 any other failure. Errors are one line on
stderr; `--debug` adds the traceback. Heavy imports (torch, transformers, prefect) happen after
argument parsing, so `--help` and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from lora_prep.cli_options import UsageError, add_settings_options, settings_from_args
from lora_prep.tasks.errors import InvalidInput, LoraPrepError

EXIT_OK = 0
# lora-prep's own bound on the Prefect client in this process (set before Prefect is imported, so
# every Prefect thread sees it; values the user exported win): a request that hangs gives up after
# 20 s (Prefect's default is 60) and is retried. Prefect's own 5 retries (2+4+8+16+32 s) stay: a busy
# SQLite-backed server answers 503 for a while under 8 runs at once (3 retries were not enough on a
# loaded 2-core machine), and a dead API is ended by the watchdog (prefect_api.py) within ~25 s anyway.
PREFECT_CLIENT_BOUND = {"PREFECT_API_REQUEST_TIMEOUT": "20"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage + error
        raise UsageError(f"{message} (see 'lora-prep {self.prog.split()[-1]} --help')")


# --- commands -----------------------------------------------------------------


class _OnlyWarnings(logging.Filter):
    """Console only: of Prefect's own records keep the warnings about the run. Its INFO lines (run
    started, "Finished in state Failed(<the error again>)") and ERROR lines (tracebacks) would repeat
    what the CLI says in its summary or its one error line, and its client's complaints about a lost
    API connection (prefect.events, prefect._internal) are what the one error line says, once. The
    Prefect UI still gets the run's records; --debug shows them all here too. Download progress bars
    are not log records and stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        return record.levelno == logging.WARNING and not record.name.startswith(("prefect.events", "prefect._internal"))


def _quiet_console(debug: bool) -> None:
    if debug:
        return
    from prefect.logging import configuration
    from prefect.logging.handlers import PrefectConsoleHandler

    if not configuration.PROCESS_LOGGING_CONFIG:
        configuration.setup_logging()
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for handler in {id(h): h for lg in loggers for h in lg.handlers}.values():
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(_OnlyWarnings())


def cmd_prepare(args) -> int:
    import warnings

    from lora_prep.prefect_api import prefect_api

    # PEFT calls a transformers 5 property deprecated in favour of is_activation_checkpointing;
    # the warning is PEFT's to fix and tells a CLI user nothing.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    settings = settings_from_args(args)
    _check_model_arguments(args.model_id, args.revision)  # before any Prefect server is found or started
    with prefect_api() as api:
        from lora_prep.flows.prepare_model import (
            prepare_model,  # imports torch, transformers, peft
        )

        _quiet_console(args.debug)
        result = api.run(prepare_model, model_id=args.model_id, revision=args.revision, **settings)
    if args.json:
        print(result.model_dump_json())
        return EXIT_OK
    from lora_prep.tasks.tracking.runs import where_to_open

    pin = result.commit_sha or f"content digest {result.content_digest}"
    experts = f", {len(result.target_parameters)} expert parameters" if result.target_parameters else ""
    lines = [
        f"artifact   {result.artifact_dir}",
        f"model      {result.repo_id} @ {pin} (requested {result.revision})",
        f"targets    {len(result.target_modules)} modules{experts}: "
        f"{', '.join(sorted({t.rsplit('.', 1)[-1] for t in result.target_modules + result.target_parameters}))}",
        f"params     {result.total_params:,} total, {result.trainable_params:,} trainable",
        f"download   {result.bytes_downloaded:,} bytes{' (cache)' if result.from_cache else ''}{' (offline)' if result.offline else ''}",
        f"mlflow     run {result.mlflow_run_id} at {result.mlflow_tracking_uri}",
    ]
    if result.model_uri:
        lines.append(f"registered {result.model_uri}")
    lines.append(f"open       {where_to_open(result.mlflow_tracking_uri, result.mlflow_run_url).strip('`')}")
    print("\n".join(lines))
    return EXIT_OK


def _check_model_arguments(model_id: str, revision: str) -> None:
    from lora_prep.tasks.hub.cache import check_revision
    from lora_prep.tasks.hub.facts import is_local_source
    from lora_prep.tasks.hub.repo import check_model_id

    if not is_local_source(model_id):
        check_model_id(model_id)
        check_revision(revision)


def cmd_plan(args) -> int:
    settings = settings_from_args(args)
    from lora_prep.dry_run import dry_run, format_dry_run

    report = dry_run(args.model_id, args.revision, settings["source"], settings["load"], settings["lora"], settings["output"])
    print(report.model_dump_json() if args.json else format_dry_run(report))
    return EXIT_OK if report.fits else 2


def cmd_probe(args) -> int:
    from lora_prep.tasks.machine.hardware import format_profile, probe_hardware

    profile = probe_hardware(args.cache_dir)
    print(profile.model_dump_json() if args.json else format_profile(profile))
    return EXIT_OK


def cmd_load(args) -> int:
    from lora_prep.tasks.artifact.load_back import load_adapter_ready
    from lora_prep.tasks.settings import SourceSettings

    source = SourceSettings(**{k: v for k, v in dict(cache_dir=args.cache_dir, offline=args.offline or None,
                                                      allow_pickle=args.allow_pickle or None).items() if v is not None})
    loaded = load_adapter_ready(args.ref, trainable=args.trainable, tracking_uri=args.tracking_uri, source=source,
                                trust_remote_code=args.trust_remote_code, base=args.base)
    summary = loaded.summary()
    print(json.dumps(summary) if args.json else "\n".join(f"{k:<18} {v}" for k, v in summary.items()))
    return EXIT_OK


def cmd_log(args) -> int:
    from pathlib import Path

    from lora_prep.tasks.settings import TrackingSettings
    from lora_prep.tasks.tracking.artifacts import log_artifact_run

    values = dict(tracking_uri=args.tracking_uri, experiment=args.experiment, register_as=args.register_as, alias=args.alias)
    tracking = TrackingSettings(**{k: v for k, v in values.items() if v is not None})
    result = log_artifact_run(Path(args.artifact_dir), tracking, {"lora_prep.logged_by": "lora-prep log"}, {})
    print(result.model_dump_json() if args.json else f"logged {args.artifact_dir} as MLflow run {result.run_id} at {result.tracking_uri}")
    return EXIT_OK


def cmd_doctor(args) -> int:
    """Close what crashed runs left behind: RUNNING MLflow runs of dead processes, partial artifacts."""
    from lora_prep.doctor import doctor

    report = doctor(args.tracking_uri, args.experiment, args.output_dir)
    print(json.dumps(report) if args.json else "\n".join(f"{k:<22} {v}" for k, v in report.items()))
    return EXIT_OK


def cmd_server(args) -> int:
    """The shared local Prefect server of the embedded default: start, status, stop."""
    from lora_prep import local_server

    if args.action == "start":
        print(local_server.ensure())
    elif args.action == "stop":
        print("stopped" if local_server.stop() else "not running")
    else:
        state = local_server.status()
        print(json.dumps(state) if args.json else "\n".join(f"{k:<14} {v}" for k, v in state.items()))
    return EXIT_OK


def cmd_serve(args) -> int:
    from lora_prep.deployments.serve import serve_all

    serve_all()
    return EXIT_OK


def _command(sub, name: str, func, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-prep", description="Prepare Hugging Face models for LoRA fine-tuning, tracked in MLflow, orchestrated by Prefect.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for name, func, text in (("prepare", cmd_prepare, "run the prepare flow: resolve, plan, download, load, wrap with LoRA, check, save, log to MLflow"),
                             ("plan", cmd_plan, "dry run: what prepare would fetch, how it would load and what gets LoRA, without downloading weights")):
        p = _command(sub, name, func, text)
        p.add_argument("model_id", help="Hugging Face Hub model id (e.g. meta-llama/Llama-3.2-1B) or a local model directory")
        p.add_argument("--revision", default="main", help="branch, tag or full commit sha (default: main); for a local directory, the digest of its *.py files to allow its remote code")
        add_settings_options(p)
        p.add_argument("--json", action="store_true", help="print the result as one JSON object")

    p = _command(sub, "probe", cmd_probe, "show what this machine can do")
    p.add_argument("--cache-dir", help="Hugging Face cache directory whose disk is measured")
    p.add_argument("--json", action="store_true")

    p = _command(sub, "load", cmd_load, "load an artifact (directory, runs:/ or models:/ URI) back and describe it")
    p.add_argument("ref", help="artifact directory, runs:/<run id>[/artifact], models:/<name>@<alias> or models:/<logged model id>")
    p.add_argument("--trainable", action="store_true", help="load the adapter trainable")
    p.add_argument("--base", help="a local directory holding the base model (a copy of the one the artifact was made from)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ and models:/ references")
    p.add_argument("--cache-dir", help="Hugging Face cache directory for the base model")
    p.add_argument("--offline", action="store_true", help="use only the local cache")
    p.add_argument("--allow-pickle", action="store_true", help="the base has only pickle weights and you allow them")
    p.add_argument("--trust-remote-code", action="store_true", help="the base runs its own code and you allow it")
    p.add_argument("--json", action="store_true")

    p = _command(sub, "log", cmd_log, "log an existing artifact directory to MLflow (e.g. after MLflow was unreachable), into its preparation's run")
    p.add_argument("artifact_dir")
    for flag in ("--tracking-uri", "--experiment", "--register-as", "--alias"):
        p.add_argument(flag)
    p.add_argument("--json", action="store_true")

    p = _command(sub, "doctor", cmd_doctor, "close what crashed runs left: MLflow runs left RUNNING by dead processes, partial artifact directories")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment", default="lora-prep")
    p.add_argument("--output-dir", help="artifacts directory to clean of partial directories (default: the per-user one)")
    p.add_argument("--json", action="store_true")

    p = _command(sub, "server", cmd_server, "the local Prefect server runs share when PREFECT_API_URL is unset: start | status | stop")
    p.add_argument("action", choices=("start", "status", "stop"))
    p.add_argument("--json", action="store_true")

    _command(sub, "serve", cmd_serve, "serve the prepare and training deployments from this process (no work pool)")
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def classify(exc: BaseException) -> BaseException:
    """The error the CLI reports: ours as is; a library's transport error turned into ours; else unchanged."""
    if isinstance(exc, LoraPrepError):
        return exc
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):  # a settings model or a flow parameter rejected a value
        return InvalidInput(f"invalid parameters: {' '.join(str(exc).split())}")
    import httpx

    if isinstance(exc, httpx.TransportError):  # Prefect's client (huggingface_hub uses httpx2, MLflow requests)
        from prefect.settings import PREFECT_API_URL

        from lora_prep.tasks.errors import OrchestratorUnavailable

        url = PREFECT_API_URL.value() or "the embedded server"
        return OrchestratorUnavailable(f"the Prefect API at {url} does not answer ({type(exc).__name__}): start it "
                                       "(prefect server start) or unset PREFECT_API_URL to use lora-prep's local server.")
    from lora_prep.tasks.tracking.store import is_connection_problem

    if is_connection_problem(exc):
        from lora_prep.tasks.errors import TrackingUnavailable

        return TrackingUnavailable(f"MLflow is unreachable ({type(exc).__name__}): start the tracking server or check --tracking-uri.")
    return exc


def console_main() -> None:
    """The `lora-prep` console script: this process is ours, so Prefect's client is bounded for it."""
    for key, value in PREFECT_CLIENT_BOUND.items():
        os.environ.setdefault(key, value)
    # Production logging: a handler that fails (Prefect's API log shipping once its API is gone)
    # does not print its own traceback or "--- Error logging to API ---" under our one error line.
    logging.raiseExceptions = False
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.debug = debug
        return args.func(args)
    except UsageError as exc:
        print(f"lora-prep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-prep: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # the top of the program: map every error to an exit code
        if isinstance(exc, SystemExit):
            raise
        from lora_prep.cli import classify
        from lora_prep.tasks.errors import exit_code

        if debug:
            traceback.print_exc()
        exc = classify(exc)
        prefix = "" if hasattr(exc, "exit_code") else f"{type(exc).__name__}: "
        print(f"lora-prep: error: {prefix}{_one_line(exc)}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    console_main()
