"""`lora-prep`: prepare | plan | probe | load | log | doctor | server | serve.

Every command's arguments are generated from settings models (``COMMANDS`` below, ``cli_options``).
Exit codes (``tasks/errors.py`` ``exit_code``): 0 success; 2 invalid input, not found, a refusal or a
bad repo (the message says what to change); 1 any other failure. Errors are one line on stderr;
``--debug`` adds the traceback. Heavy imports (torch, transformers, prefect) happen after argument
parsing, so ``--help`` and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from lora_prep.cli_options import Section, UsageError, add_arguments, settings_from_args
from lora_prep.tasks.machine.kbit import one_run_process, quiet_bitsandbytes
from lora_prep.tasks.settings import (
    ArtifactDirectory,
    LoadBackSettings,
    LoadSettings,
    LoraSettings,
    ModelReference,
    OutputSettings,
    ServerAction,
    SourceSettings,
    TrackingSettings,
)

EXIT_OK = 0
# lora-prep's own bound on the Prefect client in this process (set before Prefect is imported, so
# every Prefect thread sees it; values the user exported win): a request that hangs gives up after
# 20 s (Prefect's default is 60) and is retried. Prefect's own 5 retries (2+4+8+16+32 s) stay: a busy
# SQLite-backed server answers 503 for a while under 8 runs at once (3 retries were not enough on a
# loaded 2-core machine), and a dead API is ended by the watchdog (prefect_api.py) within ~25 s anyway.
PREFECT_CLIENT_BOUND = {"PREFECT_API_REQUEST_TIMEOUT": "20"}
# The CLI's runs send no usage data (Prefect's SDK, huggingface_hub and MLflow all honour the DO_NOT_TRACK
# convention), so Prefect's first-run telemetry notice has nothing to announce. A value the user set wins.
NO_TELEMETRY = {"DO_NOT_TRACK": "true"}  # "true": the one spelling all three read as yes
Settings = dict[str, Any]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of argparse's usage + error
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _OnlyWarnings(logging.Filter):
    """Console only: warnings and errors, and of Prefect's own records only the warnings about the run.

    A successful run prints its progress bars and its summary: INFO records (ours, Prefect's "run
    started / finished", the libraries') would repeat what the summary says, Prefect's ERROR records
    (tracebacks) what the one error line says, and its client's complaints about a lost API connection
    (prefect.events, prefect._internal) are what that line says, once. The Prefect UI still gets every
    record; --debug shows them all here too. Download progress bars are not log records and stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return record.levelno >= logging.WARNING
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


# --- commands: (parsed arguments, their settings) -> exit code -------------------------------------


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    import warnings

    from lora_prep.prefect_api import prefect_api

    # PEFT calls a transformers 5 property deprecated in favour of is_activation_checkpointing;
    # the warning is PEFT's to fix and tells a CLI user nothing.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    model: ModelReference = settings.pop("model")
    _check_model_arguments(model)  # before any Prefect server is found or started
    with prefect_api() as api:
        from lora_prep.flows.prepare_model import prepare_model  # imports torch, transformers, peft

        _quiet_console(args.debug)
        result = api.run(prepare_model, model_id=model.model_id, revision=model.revision, **settings)
    if args.json:
        print(result.model_dump_json())
        return EXIT_OK
    from lora_prep.tasks.artifact.summary import as_text, preparation_rows
    from lora_prep.tasks.records.manifest import Manifest

    print(as_text(preparation_rows(result, Manifest.read(result.artifact_dir), result.mlflow_open)))
    return EXIT_OK


def _check_model_arguments(model: ModelReference) -> None:
    from lora_prep.tasks.hub.cache import check_revision
    from lora_prep.tasks.hub.facts import is_local_source
    from lora_prep.tasks.hub.repo import check_model_id

    if not is_local_source(model.model_id):
        check_model_id(model.model_id)
        check_revision(model.revision)


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from lora_prep.dry_run import dry_run
    from lora_prep.tasks.artifact.summary import as_text, plan_rows

    model: ModelReference = settings["model"]
    report = dry_run(
        model.model_id,
        model.revision,
        settings["source"],
        settings["load"],
        settings["lora"],
        settings["output"],
        settings["tracking"],
    )
    print(report.model_dump_json() if args.json else as_text(plan_rows(report)))
    return EXIT_OK if report.fits else 2


def cmd_probe(args: argparse.Namespace, settings: Settings) -> int:
    from lora_prep.tasks.machine.hardware import format_profile, probe_hardware

    profile = probe_hardware(settings["source"].cache_dir)
    print(profile.model_dump_json() if args.json else format_profile(profile))
    return EXIT_OK


def cmd_load(args: argparse.Namespace, settings: Settings) -> int:
    from lora_prep.tasks.artifact.load_back import load_adapter_ready

    artifact: LoadBackSettings = settings["artifact"]
    loaded = load_adapter_ready(
        artifact.ref,
        trainable=artifact.trainable,
        tracking_uri=settings["tracking"].tracking_uri,
        source=settings["source"],
        trust_remote_code=artifact.trust_remote_code,
        base=artifact.base,
    )
    summary = loaded.summary()
    print(json.dumps(summary) if args.json else "\n".join(f"{k:<18} {v}" for k, v in summary.items()))
    return EXIT_OK


def cmd_log(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from lora_prep.tasks.tracking.artifacts import log_artifact_run
    from lora_prep.tasks.tracking.runs import LOGGED_BY_TAG

    artifact_dir = settings["artifact"].artifact_dir
    result = log_artifact_run(Path(artifact_dir), settings["tracking"], {LOGGED_BY_TAG: "lora-prep log"}, {})
    print(result.model_dump_json() if args.json else f"logged {artifact_dir} as MLflow run {result.run_id}; open: {result.open_with}")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from lora_prep.doctor import doctor

    report = doctor(settings["tracking"], settings["output"])
    print(json.dumps(report) if args.json else "\n".join(f"{k:<28} {v}" for k, v in report.items()))
    return EXIT_OK


def cmd_server(args: argparse.Namespace, settings: Settings) -> int:
    from lora_prep import local_server

    action = settings["server"].action
    if action == "start":
        url = local_server.ensure()
        print(json.dumps({"url": url}) if args.json else url)
    elif action == "stop":
        stopped = local_server.stop()
        print(json.dumps({"stopped": stopped}) if args.json else "stopped" if stopped else "not running")
    else:
        state = local_server.status()
        print(json.dumps(state) if args.json else "\n".join(f"{k:<14} {v}" for k, v in state.items()))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from lora_prep.deployments.serve import serve_all

    serve_all()
    return EXIT_OK


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace, Settings], int]
    help: str
    sections: tuple[Section, ...] = ()
    json: bool = True


_MODEL = Section("model", ModelReference, positional=("model_id",))
_EVERY_SETTING = (
    _MODEL,
    Section("source", SourceSettings),
    Section("load", LoadSettings),
    Section("lora", LoraSettings),
    Section("tracking", TrackingSettings),
    Section("output", OutputSettings),
)
COMMANDS = (
    Command(
        "prepare",
        cmd_prepare,
        "run the prepare flow: resolve, plan, download, load, wrap with LoRA, check, save, log to MLflow",
        _EVERY_SETTING,
    ),
    Command(
        "plan",
        cmd_plan,
        "dry run: what prepare would fetch, how it would load and what gets LoRA, without downloading weights",
        _EVERY_SETTING,
    ),
    Command("probe", cmd_probe, "show what this machine can do", (Section("source", SourceSettings, fields=("cache_dir",)),)),
    Command(
        "load",
        cmd_load,
        "load an artifact (directory, runs:/ or models:/ URI) back and describe it",
        (
            Section("artifact", LoadBackSettings, positional=("ref",)),
            Section("source", SourceSettings),
            Section("tracking", TrackingSettings, fields=("tracking_uri",)),
        ),
    ),
    Command(
        "log",
        cmd_log,
        "log an existing artifact directory to MLflow (e.g. after MLflow was unreachable), into its preparation's run",
        (Section("artifact", ArtifactDirectory, positional=("artifact_dir",)), Section("tracking", TrackingSettings)),
    ),
    Command(
        "doctor",
        cmd_doctor,
        "close what crashed runs left: MLflow runs and Prefect flow runs of dead processes, partial files",
        (
            Section("tracking", TrackingSettings, fields=("tracking_uri", "experiment")),
            Section("output", OutputSettings, fields=("output_dir",)),
        ),
    ),
    Command(
        "server",
        cmd_server,
        "the local Prefect server runs share when PREFECT_API_URL is unset: start | status | stop",
        (Section("server", ServerAction, positional=("action",)),),
    ),
    Command("serve", cmd_serve, "serve the prepare and training deployments from this process (no work pool)", json=False),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lora-prep", description="Prepare Hugging Face models for LoRA fine-tuning, tracked in MLflow, orchestrated by Prefect."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and every log record")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        add_arguments(p, list(command.sections))
        if command.json:
            p.add_argument("--json", action="store_true", help="print the result as one JSON object")
        p.add_argument("--debug", action="store_true", help="show tracebacks and every log record")
        p.set_defaults(command_spec=command)
    return parser


def console_main() -> None:
    """The `lora-prep` console script: this process is ours, so Prefect's client is bounded for it."""
    for key, value in {**PREFECT_CLIENT_BOUND, **NO_TELEMETRY}.items():
        os.environ.setdefault(key, value)
    # Production logging: a handler that fails (Prefect's API log shipping once its API is gone)
    # does not print its own traceback or "--- Error logging to API ---" under our one error line.
    logging.raiseExceptions = False
    sys.exit(main(console=True))


# The commands that run one preparation or one plan in this process and end it.
ONE_RUN_COMMANDS = ("prepare", "plan")


def main(argv: list[str] | None = None, *, console: bool = False) -> int:
    """console=True: the console script's own process, which ends with this command (an embedding caller's does not)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.debug = debug
        command: Command = args.command_spec
        if console and command.name in ONE_RUN_COMMANDS:
            one_run_process()  # an unquantized run keeps bitsandbytes out of this process (keep_bitsandbytes_out)
        # PEFT imports bitsandbytes wherever it is installed, and bitsandbytes' CPU backend announces at import that an
        # optional faster kernel is missing: a speed note, not the user's problem, between our lines.
        with quiet_bitsandbytes():
            return command.run(args, settings_from_args(args, list(command.sections)))
    except UsageError as exc:
        print(f"lora-prep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-prep: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # the top of the program: map every error to an exit code
        if isinstance(exc, SystemExit):
            raise
        from lora_prep.cli_errors import classify, one_line
        from lora_prep.tasks.errors import exit_code

        if debug:
            traceback.print_exc()
        exc = classify(exc)
        print(f"lora-prep: error: {one_line(exc)}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    console_main()
