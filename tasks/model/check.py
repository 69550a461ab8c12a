"""An artifact is ready only if the model still runs: one forward and one backward pass before it is written.

A few tokens through the LoRA-wrapped model, the causal-LM loss, ``backward()``: LoRA on a module
whose forward contract differs (a router that subclasses nn.Linear but returns a tuple, a custom
kernel that reads ``.weight`` directly...) fails here, and the error names the LoRA module in flight
when it failed, with the fix. The gradients are cleared afterwards.

What runs: the embeddings, **one decoder layer of each kind** (layers with the same class and the
same module tree, LoRA layers included, behave alike: a Llama has one kind, DeepSeek-V3 a dense and
an MoE kind, Jamba a few), the final norm and the head. The model's layer list is shortened to those
for the pass and restored after. This is what keeps the check cheap: a full pass over a memory-mapped
CPU model reads every weight (measured on a 0.85 B bf16 model on 2 cores: 5.9 s forward + 12.8 s
backward, and 1.7 GB of file-backed RSS). A model whose forward cannot run on a shortened layer list
(it indexes per-layer config by position, say) is checked with all its layers instead.
``output.check=false`` skips the check.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from lora_prep.tasks.errors import InvalidInput, LoraPrepError
from lora_prep.tasks.records.build import CheckRecord

CHECK_TEXT = "The adapter learns while the base model stays frozen."
CHECK_TOKENS = 8


def _ids(tokenizer, device):
    import torch

    ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"][:, :CHECK_TOKENS]
    if ids.shape[1] < 2:  # a loss needs two positions
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        ids = torch.tensor([[eos, eos]])
    return ids.to(device)


# --- one layer of each kind --------------------------------------------------------------------


def decoder_layers(model):
    """The model's decoder layer list: the shallowest ModuleList as long as config.num_hidden_layers."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(base.config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 2:
        return None
    lists = [(name, m) for name, m in base.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    return min(lists, key=lambda item: item[0].count("."))[1] if lists else None


def _kind(layer) -> tuple:
    return (type(layer).__name__, tuple((name, type(m).__name__) for name, m in layer.named_modules()))


def one_of_each_kind(layers) -> list[int]:
    seen: dict[tuple, int] = {}
    for i, layer in enumerate(layers):
        seen.setdefault(_kind(layer), i)
    return sorted(seen.values())


@contextlib.contextmanager
def only_layers(model, layers, indices: list[int]) -> Iterator[None]:
    """The layer list shortened to ``indices`` (and config.num_hidden_layers with it), restored after."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved_modules, saved_n = layers._modules, base.config.num_hidden_layers
    layers._modules = OrderedDict((str(j), saved_modules[str(i)]) for j, i in enumerate(indices))
    base.config.num_hidden_layers = len(indices)
    try:
        yield
    finally:
        layers._modules = saved_modules
        base.config.num_hidden_layers = saved_n


# --- the pass ------------------------------------------------------------------------------------


def _entering(in_flight: list[str], name: str):
    def hook(module, args) -> None:  # a hook that returns a value would replace the input or output
        in_flight.append(name)

    return hook


def _leaving(in_flight: list[str]):
    def hook(module, args, output) -> None:
        if in_flight:
            in_flight.pop()

    return hook


class _Broke(Exception):
    def __init__(self, exc: BaseException, module: str | None) -> None:
        super().__init__(str(exc))
        self.exc, self.module = exc, module


def _one_pass(peft_model, ids, backward: bool) -> float:
    """Loss of one pass; raises _Broke with the LoRA module in flight (or None) when the model fails."""
    from peft.tuners.lora import LoraLayer

    in_flight: list[str] = []
    handles = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and not any(part.startswith("lora_") for part in name.split(".")):
            short = name.removeprefix("base_model.model.")
            handles.append(module.register_forward_pre_hook(_entering(in_flight, short)))
            handles.append(module.register_forward_hook(_leaving(in_flight)))
    try:
        loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        if loss is None or not math.isfinite(float(loss.detach())):
            raise LoraPrepError(
                f"the LoRA-wrapped model gives a non-finite loss ({loss}) on {ids.shape[1]} tokens: "
                "the base weights or the load dtype are broken; try load.dtype=float32."
            )
        if backward:
            loss.backward()
            if not any(p.grad is not None for p in peft_model.parameters() if p.requires_grad):
                raise LoraPrepError(
                    "the backward pass gave no gradient to any trainable parameter: the adapter would not train; "
                    "check gradient_checkpointing and the LoRA targets."
                )
        return float(loss.detach())
    except LoraPrepError:
        raise
    except Exception as exc:
        raise _Broke(exc, in_flight[-1] if in_flight else None) from exc
    finally:
        for h in handles:
            h.remove()
        for p in peft_model.parameters():
            p.grad = None


def _refusal(broke: _Broke) -> LoraPrepError:
    detail = " ".join(f"{type(broke.exc).__name__}: {broke.exc}".split())[:240]
    if broke.module:
        leaf = broke.module.rsplit(".", 1)[-1]
        return InvalidInput(
            f"LoRA on {broke.module} breaks the model: its forward pass fails ({detail}); leave it out "
            f"(exclude_modules=[{leaf!r}], --exclude-modules {leaf}) or target other modules."
        )
    return LoraPrepError(
        f"the model fails a forward pass outside its LoRA layers ({detail}): check that it runs without LoRA (a transformers or model bug)."
    )


def _keep_kbit_layers_training(model: Any) -> None:
    """bitsandbytes' 4-bit layers stay in training mode (they have no dropout): in eval mode, on a CPU with
    AVX512-BF16, bitsandbytes 0.50 repacks a layer's weight in place for inference on its first forward
    (un-nesting the double-quantized absmax, so the model grows, and failing for layers narrower than its
    64-weight block). The check is a training step; the model must leave it as it entered."""
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            module.train()


def run_check(peft_model, tokenizer, *, backward: bool = True) -> CheckRecord:
    """Forward (and backward) on a few tokens through one layer of each kind; raises InvalidInput naming
    the LoRA module that broke the model."""
    started = time.perf_counter()
    was_training = peft_model.training
    peft_model.eval()  # no dropout: the check is deterministic; gradients still flow
    _keep_kbit_layers_training(peft_model)
    ids = _ids(tokenizer, peft_model.get_input_embeddings().weight.device)
    layers = decoder_layers(peft_model)
    total = len(layers) if layers is not None else 0
    try:
        loss, ran = None, total
        if layers is not None:
            chosen = one_of_each_kind(layers)
            try:
                with only_layers(peft_model, layers, chosen):
                    loss, ran = _one_pass(peft_model, ids, backward), len(chosen)
            except _Broke as broke:
                if broke.module:  # a LoRA layer failed: that is the answer, on any number of layers
                    raise _refusal(broke) from broke.exc
                loss = None  # the shortened model cannot run: check the whole one
        if loss is None:
            try:
                loss, ran = _one_pass(peft_model, ids, backward), total
            except _Broke as broke:
                raise _refusal(broke) from broke.exc
    finally:
        peft_model.train(was_training)
    return CheckRecord(
        forward=True,
        backward=backward,
        tokens=int(ids.shape[1]),
        layers=ran,
        layers_total=total,
        loss=round(loss, 6),
        seconds=round(time.perf_counter() - started, 3),
    )


def skipped() -> CheckRecord:
    return CheckRecord(forward=False, backward=False, tokens=0, loss=None, seconds=0.0)
