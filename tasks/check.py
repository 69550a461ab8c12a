"""An artifact is ready only if the model still runs: one forward and one backward pass before it is written.

A few tokens through the LoRA-wrapped model, the causal-LM loss, ``backward()``: LoRA on a module
whose forward contract differs (a router that subclasses nn.Linear but returns a tuple, a custom
kernel that reads ``.weight`` directly and bypasses LoRA...) fails here, and the error names the
LoRA module in flight when it failed, with the fix. The gradients are cleared afterwards.

Cost: one pass over every weight (a file-backed page-in for memory-mapped CPU loads), a few
tokens of activations. ``output.check=false`` skips it.
"""

from __future__ import annotations

import math
import time

from lora_prep.tasks.errors import InvalidInput, LoraPrepError
from lora_prep.tasks.manifest import CheckRecord

CHECK_TEXT = "The adapter learns while the base model stays frozen."
CHECK_TOKENS = 8


def _ids(tokenizer, device):
    import torch

    ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"][:, :CHECK_TOKENS]
    if ids.shape[1] < 2:  # a loss needs two positions
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        ids = torch.tensor([[eos, eos]])
    return ids.to(device)


def _entering(in_flight: list[str], name: str):
    def hook(module, args) -> None:  # a hook that returns a value would replace the input or output
        in_flight.append(name)

    return hook


def _leaving(in_flight: list[str]):
    def hook(module, args, output) -> None:
        if in_flight:
            in_flight.pop()

    return hook


def run_check(peft_model, tokenizer, *, backward: bool = True) -> CheckRecord:
    """Forward (and backward) on a few tokens; raises InvalidInput naming the LoRA module that broke the model."""
    from peft.tuners.lora import LoraLayer

    started = time.perf_counter()
    in_flight: list[str] = []
    handles = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and not any(part.startswith("lora_") for part in name.split(".")):
            short = name.removeprefix("base_model.model.")
            handles.append(module.register_forward_pre_hook(_entering(in_flight, short)))
            handles.append(module.register_forward_hook(_leaving(in_flight)))
    was_training = peft_model.training
    peft_model.eval()  # no dropout: the check is deterministic; gradients still flow
    ids = _ids(tokenizer, peft_model.get_input_embeddings().weight.device)
    try:
        out = peft_model(input_ids=ids, labels=ids)
        loss = out.loss
        if loss is None or not math.isfinite(float(loss.detach())):
            raise LoraPrepError(f"the LoRA-wrapped model gives a non-finite loss ({loss}) on {ids.shape[1]} tokens: "
                                "the base weights or the load dtype are broken; try load.dtype=float32.")
        if backward:
            loss.backward()
            got = [p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad]
            if not any(got):
                raise LoraPrepError("the backward pass gave no gradient to any trainable parameter: the adapter would not train; "
                                    "check gradient_checkpointing and the LoRA targets.")
    except LoraPrepError:
        raise
    except Exception as exc:  # the wrapped model itself failed: name where
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:240]
        if in_flight:
            module = in_flight[-1]
            leaf = module.rsplit(".", 1)[-1]
            raise InvalidInput(
                f"LoRA on {module} breaks the model: its forward pass fails ({detail}); leave it out "
                f"(exclude_modules=[{leaf!r}], --exclude-modules {leaf}) or target other modules."
            ) from exc
        raise LoraPrepError(f"the model fails a forward pass outside its LoRA layers ({detail}): "
                            "check that it runs without LoRA (a transformers or model bug).") from exc
    finally:
        for h in handles:
            h.remove()
        for p in peft_model.parameters():
            p.grad = None
        peft_model.train(was_training)
    return CheckRecord(forward=True, backward=backward, tokens=int(ids.shape[1]), loss=round(float(loss.detach()), 6),
                       seconds=round(time.perf_counter() - started, 3))


def skipped() -> CheckRecord:
    return CheckRecord(forward=False, backward=False, tokens=0, loss=None, seconds=0.0)

