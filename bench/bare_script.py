"""What `lora-prep prepare` is compared against: the ten lines anyone would write by hand.

    python bench/bare_script.py REPO_ID OUT_DIR TRACKING_URI ARTIFACT_LOCATION [DTYPE]

Download the repo (Hub cache, HF_ENDPOINT honoured), load it in DTYPE (default bfloat16), wrap every
linear layer with a rank-16 LoRA adapter, save the adapter and the tokenizer, log that directory to
MLflow in a SQLite store under an experiment with an explicit artifact location. No checks, no
retries, no manifest, no orchestration.
"""

import sys

import mlflow
import torch
from huggingface_hub import snapshot_download
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

repo_id, out, tracking_uri, artifact_location = sys.argv[1:5]
dtype = getattr(torch, sys.argv[5] if len(sys.argv) > 5 else "bfloat16")

path = snapshot_download(repo_id)
model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
model.save_pretrained(out)
AutoTokenizer.from_pretrained(path).save_pretrained(out)

mlflow.set_tracking_uri(tracking_uri)
if mlflow.get_experiment_by_name("bare") is None:
    mlflow.create_experiment("bare", artifact_location=artifact_location)
mlflow.set_experiment("bare")
with mlflow.start_run():
    mlflow.log_artifacts(out)
