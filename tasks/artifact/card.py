"""The artifact's README.md: a short model card with the load snippets."""

from __future__ import annotations

from lora_prep.tasks.artifact.summary import as_markdown, manifest_rows
from lora_prep.tasks.records.manifest import Manifest


def model_card(manifest: Manifest) -> str:
    base = manifest.base_model
    if manifest.load_used.quantization_config:  # rebuild the same k-bit base: transformers' own config, as recorded
        where = f'"{base.name_or_path}", revision="{base.commit_sha}"' if base.source == "hub" else f'"{base.name_or_path}"'
        peft_load = (
            "import json, torch\nfrom transformers import BitsAndBytesConfig\n\n"
            'manifest = json.load(open("path/to/this/directory/manifest.json"))\n'
            'quantization = BitsAndBytesConfig.from_dict(manifest["load_used"]["quantization_config"])\n'
            f"base = AutoModelForCausalLM.from_pretrained({where}, quantization_config=quantization,\n"
            f'                                            dtype=torch.{manifest.load_plan.dtype}, device_map="auto")\n'
            'model = PeftModel.from_pretrained(base, "path/to/this/directory/adapter")'
        )
    elif base.source == "hub":
        peft_load = (
            f'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/directory/adapter")  '
            f"# fetches {base.name_or_path} at {(base.commit_sha or '')[:12]}"
        )
    else:
        peft_load = (
            f'base = AutoModelForCausalLM.from_pretrained("{base.name_or_path}")  # or a copy of it\n'
            'model = PeftModel.from_pretrained(base, "path/to/this/directory/adapter")'
        )
    return f"""# LoRA-ready {base.name_or_path}

Adapter-ready artifact made by lora-prep on {manifest.created_at}.

{as_markdown(manifest_rows(manifest))}
The base weights are not in this directory: they are fetched as pinned above and checked
against the sha256 list in `manifest.json`.

## Load it

```python
from lora_prep import load_adapter_ready

model, tokenizer, manifest = load_adapter_ready("path/to/this/directory", trainable=True)
```

or with plain PEFT (`adapter_config.json` names the base and its revision):

```python
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

{peft_load}
```

or from the command line: `lora-prep load path/to/this/directory --json`.
"""


def training_card(manifest: Manifest) -> str:
    t, parent = manifest.training, manifest.parent
    assert t is not None and parent is not None, "training_card is written for a trained artifact (tasks/train.py)"
    return (
        f"\n## Training\n\nTrained {t.steps} steps at lr {t.lr} from `{parent.artifact}` "
        f"(MLflow run `{parent.mlflow_run_id}`): eval loss {t.eval_loss_before:.4f} -> {t.eval_loss_after:.4f}.\n"
    )
