"""The check before an artifact is written: one forward and backward pass through one decoder layer of
each kind (real tiny models, real PEFT wrapping), the whole model when the shortened one cannot run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lora_prep.tasks.lora.wrap import wrap_lora
from lora_prep.tasks.model.check import run_check
from lora_prep.tasks.settings import LoraSettings
from tests.model_factory import _config, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


def _model(arch: str, layers: int):
    cfg = _config(arch, torch.float32)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize(("arch", "layers", "kinds"), [("llama", 6, 1), ("deepseek_v3", 4, 2)])
def test_the_check_runs_one_decoder_layer_of_each_kind_and_gives_the_adapter_gradients(tokenizer, arch, layers, kinds):
    model, _ = wrap_lora(_model(arch, layers), LoraSettings(r=4, init_lora_weights=False))
    record = run_check(model, tokenizer)
    assert (record.layers, record.layers_total) == (kinds, layers)
    assert record.forward and record.backward and record.loss > 0
    assert len(model.get_base_model().model.layers) == layers  # restored after the pass
    assert all(p.grad is None for p in model.parameters())  # cleared


class _PositionalLlama(LlamaForCausalLM):
    """Some architectures read per-layer settings by position and cannot run on a shortened layer list:
    a real model that refuses to, so the whole-model path is exercised."""

    def forward(self, *args, **kwargs):
        if len(self.model.layers) != self._all_layers:
            raise IndexError("layer_types[3]: list index out of range")
        return super().forward(*args, **kwargs)


def test_a_model_that_cannot_run_shortened_is_checked_with_all_its_layers(tokenizer):
    base = _PositionalLlama(_config("llama", torch.float32))
    base._all_layers = len(base.model.layers)
    model, _ = wrap_lora(base, LoraSettings(r=4))
    record = run_check(model, tokenizer)
    assert record.layers == record.layers_total == base._all_layers


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3_moe", "jamba"])
def test_the_check_scores_a_slice_of_the_head_and_never_runs_the_whole_vocabulary(tokenizer, arch):
    from lora_prep.tasks.model.check import HEAD_ROWS

    model, _ = wrap_lora(_model(arch, 2), LoraSettings(r=4, init_lora_weights=False))
    head = model.get_base_model().get_output_embeddings()
    whole = []
    handle = head.register_forward_hook(lambda module, args, output: whole.append(output.shape))
    try:
        record = run_check(model, tokenizer)
    finally:
        handle.remove()
    assert whole == []  # the full vocabulary x hidden matrix was never multiplied (on CPU: never paged in)
    assert record.head_rows is not None and record.head_rows <= HEAD_ROWS + record.tokens < head.out_features
    assert model.get_base_model().get_output_embeddings() is head  # restored after the pass
    assert record.loss > 0


def test_a_head_trained_in_full_is_run_whole(tokenizer):
    model, _ = wrap_lora(_model("llama", 2), LoraSettings(r=4, modules_to_save=["lm_head"]))
    record = run_check(model, tokenizer)
    assert record.head_rows is None and record.layers == 1
