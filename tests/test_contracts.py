"""The contracts other code relies on: the manifest's schema, the public API, the CLI built from the settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_manifest_json_schema_in_docs_is_current():
    from lora_prep.tasks.records.manifest import schema_text

    committed = (ROOT / "docs" / "manifest.schema.json").read_text()
    assert committed == schema_text(), "regenerate: python -m lora_prep.tasks.records.manifest docs/manifest.schema.json"
    assert json.loads(committed)["properties"]["schema"]["const"] == "lora-prep/manifest@2"


def test_a_manifest_of_another_schema_is_refused_in_one_line_naming_both(tmp_path):
    from lora_prep.tasks.errors import InvalidInput
    from lora_prep.tasks.records.manifest import read_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "lora-prep/manifest@1", "base_model": {}}))
    with pytest.raises(InvalidInput) as err:
        read_manifest(tmp_path)
    message = str(err.value)
    assert "lora-prep/manifest@1" in message and "lora-prep/manifest@2" in message and "\n" not in message


def test_the_public_api_is_importable_from_the_package_root():
    import lora_prep

    for name in ("prepare_model", "load_adapter_ready", "SourceSettings", "LoadSettings", "LoraSettings", "TrackingSettings",
                 "OutputSettings", "PreparedModel", "Manifest", "LoraPrepError"):
        assert getattr(lora_prep, name) is not None, name
    with pytest.raises(AttributeError, match="public API"):
        lora_prep.not_a_thing  # noqa: B018


def _subparsers():
    from lora_prep.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices


def test_every_command_s_arguments_are_its_settings_fields_each_with_the_field_s_own_description():
    from lora_prep.cli import COMMANDS
    from lora_prep.cli_options import covered_fields

    parsers = _subparsers()
    assert sorted(parsers) == sorted(c.name for c in COMMANDS)
    for command in COMMANDS:
        sub = parsers[command.name]
        covered = covered_fields(sub)
        helps = {a.dest: a.help for a in sub._actions}
        for section in command.sections:
            for name, field in section.items():
                assert (section.name, name) in covered, f"{command.name}: settings field {section.name}.{name} has no argument"
                assert field.description.replace("%", "%%") in helps[f"{section.name}__{name}"]
        undocumented = [a.option_strings or a.dest for a in sub._actions if not a.help]
        assert undocumented == [], f"{command.name}: arguments without help: {undocumented}"


def test_prepare_and_plan_take_every_field_of_the_five_flow_settings():
    from lora_prep.cli_options import covered_fields
    from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings, SourceSettings, TrackingSettings

    for command in ("prepare", "plan"):
        covered = covered_fields(_subparsers()[command])
        for section, model in {"source": SourceSettings, "load": LoadSettings, "lora": LoraSettings, "tracking": TrackingSettings,
                               "output": OutputSettings}.items():
            assert {(section, name) for name in model.model_fields} <= covered, command


def test_a_usage_error_names_the_command_whose_help_to_read(capsys):
    from lora_prep.cli import main

    assert main(["prepare"]) == 2
    assert "see 'lora-prep prepare --help'" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert "see 'lora-prep --help'" in capsys.readouterr().err


def test_every_settings_field_has_a_title_for_the_prefect_form():
    from lora_prep.tasks import settings

    models = [settings.SourceSettings, settings.LoadSettings, settings.LoraSettings, settings.TrackingSettings,
              settings.OutputSettings, settings.TrainSettings, settings.ModelReference, settings.LoadBackSettings,
              settings.ArtifactDirectory, settings.ServerAction]
    for model in models:
        assert model.model_config.get("title"), f"{model.__name__}: give the model a title (the form's section label)"
        schema = model.model_json_schema()
        for name, prop in schema["properties"].items():
            assert model.model_fields[name].title, f"{model.__name__}.{name}: give it Field(title=...) (not pydantic's generated one)"
            assert prop["title"] == model.model_fields[name].title
            for member in prop.get("anyOf", []):
                assert member.get("title"), f"{model.__name__}.{name}: every union member needs a title (the form's tab label)"


@pytest.mark.parametrize("argv", [["--attn", "eager"], ["--attn-implementation", "eager"]])
def test_the_spellings_users_scripts_have_keep_working(argv):
    from lora_prep.cli import COMMANDS, build_parser
    from lora_prep.cli_options import settings_from_args

    (plan,) = [c for c in COMMANDS if c.name == "plan"]
    args = build_parser().parse_args(["plan", "org/model", *argv, "--r", "8", "--max-memory", "cpu=20GiB,0=70GiB",
                                      "--target-modules", "q_proj,v_proj", "--output-dir", "/tmp/x", "--tracking-uri",
                                      "sqlite:///x.db", "--register-as", "m", "--alias", "a", "--no-check"])
    settings = settings_from_args(args, list(plan.sections))
    assert settings["model"].model_id == "org/model" and settings["model"].revision == "main"
    assert settings["load"].attn_implementation == "eager" and settings["lora"].r == 8
    assert settings["load"].max_memory == {"cpu": "20GiB", "0": "70GiB"}
    assert settings["lora"].target_modules == ["q_proj", "v_proj"] and settings["output"].check is False
    assert settings["tracking"].register_as == "m" and settings["tracking"].alias == "a"
