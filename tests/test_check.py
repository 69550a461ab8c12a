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


def _routed_nodes(loss) -> dict[str, int]:
    """How many nodes of the loss's autograd graph are each of the check's own products."""
    from collections import Counter

    seen, stack, count = set(), [loss.grad_fn], Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for kind in ("RowBackwardLinear", "ExpertwiseFold"):
            count[kind] += kind in type(node).__name__
        stack.extend(next_node for next_node, _ in node.next_functions)
    return dict(count)


def _adapter_gradients(model, ids, routed: bool):
    import contextlib

    from lora_prep.tasks.model.check import half_precision_products

    with half_precision_products() if routed else contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads, _routed_nodes(loss)


@pytest.mark.parametrize(("arch", "folds"), [("llama", 0), ("qwen3_moe", 2), ("deepseek_v3", 2)])
def test_the_checks_products_with_frozen_bf16_weights_give_the_adapter_torchs_gradients(tokenizer, arch, folds):
    # On CPUs without native bf16 matrix kernels torch's grad_output @ weight, and PEFT's fold of LoRA into an
    # expert stack (baddbmm), are scalar loops: seconds per layer of a 7 B model, a minute and a half for a layer of
    # 128 experts. The check computes them another way (rows, one expert at a time in float32); the adapter must get
    # the gradients it gets from torch's own products, up to rounding.
    cfg = _config(arch, torch.bfloat16)
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model, _ = wrap_lora(base, LoraSettings(r=4, init_lora_weights=False))
    model.eval()
    ids = torch.tensor([[5, 17, 42, 7]])
    plain, plain_nodes = _adapter_gradients(model, ids, routed=False)
    routed, routed_nodes = _adapter_gradients(model, ids, routed=True)
    assert plain_nodes == {"RowBackwardLinear": 0, "ExpertwiseFold": 0}
    # every frozen linear whose input needs a gradient (o_proj and the dense MLP of each layer at least) goes by rows;
    # each LoRA'd expert stack (gate_up and down of each MoE layer) is folded expert by expert
    assert routed_nodes["RowBackwardLinear"] >= 2 * cfg.num_hidden_layers
    assert routed_nodes["ExpertwiseFold"] >= folds
    assert plain.keys() == routed.keys() and plain
    for name, grad in plain.items():
        scale = grad.norm().item()
        assert scale > 0, name
        assert (routed[name] - grad).norm().item() <= 0.02 * scale, name
    record = run_check(model, tokenizer)
    assert record.backward and record.loss > 0


def test_float32_and_trained_weights_keep_torchs_own_products(tokenizer):
    model, _ = wrap_lora(_model("llama", 2), LoraSettings(r=4, init_lora_weights=False))
    _, nodes = _adapter_gradients(model, torch.tensor([[5, 17, 42, 7]]), routed=True)
    assert nodes == {"RowBackwardLinear": 0, "ExpertwiseFold": 0}  # float32: torch's kernels are fast as they are
    layer = torch.nn.Linear(8, 8, dtype=torch.bfloat16)  # a weight that trains gets its own gradient from torch
    from lora_prep.tasks.model.check import half_precision_products

    with half_precision_products():
        out = layer(torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)).sum()
    out.backward()
    assert _routed_nodes(out) == {"RowBackwardLinear": 0, "ExpertwiseFold": 0} and layer.weight.grad is not None


def test_only_the_thread_that_runs_the_check_has_its_products():
    # The check runs beside other threads of the same process (MLflow's, a user's own): the routing is a
    # thread-local torch-function mode, so a bf16 product another thread takes meanwhile is torch's own.
    import threading

    from lora_prep.tasks.model.check import half_precision_products

    layer = torch.nn.Linear(8, 8, dtype=torch.bfloat16).requires_grad_(False)
    inside, entered, other = threading.Event(), threading.Event(), {}

    def elsewhere():
        assert entered.wait(30)
        other["out"] = layer(torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)).sum()
        inside.set()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    with half_precision_products():
        mine = layer(torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)).sum()
        entered.set()
        assert inside.wait(30)  # the other thread's product is taken while the mode is on here
    thread.join(30)
    assert _routed_nodes(mine)["RowBackwardLinear"] == 1
    assert _routed_nodes(other["out"])["RowBackwardLinear"] == 0
