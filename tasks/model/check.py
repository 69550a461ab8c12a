"""An artifact is ready only if the model still runs: one forward and one backward pass before it is written.

A few tokens through the LoRA-wrapped model, the causal-LM loss, ``backward()``: LoRA on a module
whose forward contract differs (a router that subclasses nn.Linear but returns a tuple, a custom
kernel that reads ``.weight`` directly...) fails here, and the error names the LoRA module in flight
when it failed, with the fix. The gradients are cleared afterwards.

What runs, and what it reads (on CPU the weights are memory-mapped: a pass reads every page it touches):

- the embeddings: a lookup reads the rows of the check's tokens only;
- **one decoder layer of each kind** (layers with the same class and the same module tree, LoRA layers
  included, behave alike: a Llama has one kind, DeepSeek-V3 a dense and an MoE kind, Jamba a few). The
  layer list is shortened to those for the pass and restored after;
- the final norm, and **a slice of the output head**: its rows for the check's tokens and the first
  ``HEAD_ROWS`` ids (the loss is taken over those), instead of the whole vocabulary x hidden matrix (1 GB
  at a 128 k vocabulary and 4 k hidden). A head with LoRA or trained in full is run whole.

Measured on a 0.85 B bf16 model on 2 cores, a full pass cost 5.9 s forward + 12.8 s backward and 1.7 GB
of file-backed RSS; this one costs one layer of each kind. A model whose forward cannot run on a shortened
layer list (it indexes per-layer config by position, say) or on a sliced head is checked whole instead.
``output.check=false`` skips the check.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from lora_prep.tasks.errors import InvalidInput, LoraPrepError
from lora_prep.tasks.records.build import CheckRecord

CHECK_TEXT = "The adapter learns while the base model stays frozen."
# Tokens through the pass: three next-token positions of a causal loss, attention over several positions; what the
# check catches (a module's forward contract, a non-finite loss, no gradient reaching the adapter) does not need more.
# Its time is linear in them (the backward below goes row by row).
CHECK_TOKENS = 4
HEAD_ROWS = 64  # vocabulary rows besides the check's own tokens that the sliced head scores
# Inputs of at most this many rows (tokens) take the row-by-row backward of half_precision_products.
ROW_BACKWARD_MAX_ROWS = 64


def _ids(tokenizer: Any, device: Any) -> Any:
    import torch

    ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"][:, :CHECK_TOKENS]
    if ids.shape[1] < 2:  # a loss needs two positions
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        ids = torch.tensor([[eos, eos]])
    return ids.to(device)


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --- one layer of each kind --------------------------------------------------------------------


def decoder_layers(model: Any) -> Any | None:
    """The model's decoder layer list: the shallowest ModuleList as long as config.num_hidden_layers."""
    import torch

    base = _base(model)
    n = getattr(base.config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 2:
        return None
    lists = [(name, m) for name, m in base.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    return min(lists, key=lambda item: item[0].count("."))[1] if lists else None


def _kind(layer: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (type(layer).__name__, tuple((name, type(m).__name__) for name, m in layer.named_modules()))


def one_of_each_kind(layers: Any) -> list[int]:
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
    for i, layer in enumerate(layers):
        seen.setdefault(_kind(layer), i)
    return sorted(seen.values())


@contextlib.contextmanager
def only_layers(model: Any, layers: Any, indices: list[int]) -> Iterator[None]:
    """The layer list shortened to ``indices`` (and config.num_hidden_layers with it), restored after."""
    base = _base(model)
    saved_modules, saved_n = layers._modules, base.config.num_hidden_layers
    layers._modules = OrderedDict((str(j), saved_modules[str(i)]) for j, i in enumerate(indices))
    base.config.num_hidden_layers = len(indices)
    try:
        yield
    finally:
        layers._modules = saved_modules
        base.config.num_hidden_layers = saved_n


# --- a slice of the output head --------------------------------------------------------------------


def _head_rows(head: Any, ids: Any) -> list[int]:
    return sorted(set(range(min(HEAD_ROWS, head.out_features))) | set(ids.flatten().tolist()))


@contextlib.contextmanager
def sliced_head(model: Any, ids: Any) -> Iterator[Callable[[Any], Any] | None]:
    """The output head scores only the check's tokens and the first HEAD_ROWS ids; yields how to map token
    ids to those columns (None: the head is run whole, being a LoRA target or trained in full)."""
    import torch

    base = _base(model)
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # a LoRA layer, a modules_to_save copy, or a model's own head class
        yield None
        return
    rows = _head_rows(head, ids)
    index = torch.tensor(rows, device=head.weight.device)
    column = torch.full((head.out_features,), -100, dtype=torch.long, device=ids.device)
    column[index.to(ids.device)] = torch.arange(len(rows), device=ids.device)

    class SlicedHead(torch.nn.Module):
        def forward(self, hidden: Any) -> Any:
            # index_select reads only these rows of the weight (of a memory-mapped one: only their pages).
            weight = head.weight.index_select(0, index)
            bias = head.bias.index_select(0, index) if head.bias is not None else None
            return torch.nn.functional.linear(hidden, weight, bias)

    base.set_output_embeddings(SlicedHead())
    try:
        yield lambda token_ids: column[token_ids]
    finally:
        base.set_output_embeddings(head)


# --- products with frozen half-precision weights that are not scalar loops -----------------------------


def half_precision_products() -> Any:
    """A torch-function mode for the check's pass on CPU: two products with frozen bf16/fp16 weights that torch
    computes in a scalar loop on CPUs without native half-precision matrix kernels (AVX2 only) are computed
    another way, with the same numbers up to rounding.

    - The input gradient of ``F.linear`` (grad_output @ weight): measured on 2 AVX2 cores, 8 x 11008 by
      11008 x 4096 in bf16 takes 1.28 s, the forward's product 17 ms. As matrix-vector products, one per
      token (the check has a handful), it takes 41 ms: a handful of passes over a weight the forward has
      already read. For nn.Linear layers, LoRA's base layers, experts that call F.linear on a stacked weight.
    - ``torch.baddbmm(weight, lhs, rhs)`` of a frozen stacked expert weight, forward and backward: PEFT folds
      LoRA on an expert stack into the weight that way (W + scaling * lhs @ rhs over all experts). One layer of
      128 experts of 1536 x 2048 (a Qwen3-30B-A3B layer) took 38 s forward and 49 s backward; here each expert's
      low-rank product is taken in float32, one expert at a time (a float32 copy of one expert, not of the stack).

    Anything else (weights that train, quantized weights, tensor subclasses, GPU tensors, more rows than a check
    has) runs as torch runs it. Torch-function modes are thread-local: only the thread that runs the check sees it.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    linear, baddbmm = torch.nn.functional.linear, torch.baddbmm
    plain = (torch.Tensor, torch.nn.Parameter)
    half = (torch.bfloat16, torch.float16)

    class RowBackwardLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any) -> Any:
            ctx.save_for_backward(weight)  # the frozen weight itself, not a copy
            ctx.has_bias = bias is not None
            return linear(x, weight, bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            (weight,) = ctx.saved_tensors
            rows = grad.reshape(-1, grad.shape[-1])
            grad_input = grad_bias = None
            if ctx.needs_input_grad[0]:
                transposed = weight.t()
                grad_input = torch.stack([torch.mv(transposed, row) for row in rows])
                grad_input = grad_input.reshape(*grad.shape[:-1], weight.shape[1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = rows.sum(0)
            return grad_input, None, grad_bias

    class ExpertwiseFold(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, weight: Any, lhs: Any, rhs: Any, alpha: float) -> Any:
            ctx.save_for_backward(lhs, rhs)
            ctx.alpha = alpha
            out = torch.empty_like(weight)
            for e in range(weight.shape[0]):
                out[e] = torch.addmm(weight[e].float(), lhs[e].float(), rhs[e].float(), alpha=alpha)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            lhs, rhs = ctx.saved_tensors
            grad_lhs = torch.empty_like(lhs) if ctx.needs_input_grad[1] else None
            grad_rhs = torch.empty_like(rhs) if ctx.needs_input_grad[2] else None
            for e in range(grad.shape[0]):
                g = grad[e].float()
                if grad_lhs is not None:
                    grad_lhs[e] = torch.mm(g, rhs[e].float().t()).mul_(ctx.alpha)
                if grad_rhs is not None:
                    grad_rhs[e] = torch.mm(lhs[e].float().t(), g).mul_(ctx.alpha)
            return None, grad_lhs, grad_rhs, None

    def frozen_half(weight: Any, dims: int) -> bool:
        return (
            type(weight) in plain
            and not weight.requires_grad
            and weight.dim() == dims
            and weight.device.type == "cpu"
            and weight.dtype in half
        )

    def linear_by_rows(args: Any, kwargs: Any) -> Any:
        bound: dict[str, Any] = dict(zip(("input", "weight", "bias"), args, strict=False), **kwargs)
        x: Any = bound.get("input")
        weight: Any = bound.get("weight")
        bias: Any = bound.get("bias")
        if not (
            len(args) <= 3
            and set(bound) <= {"input", "weight", "bias"}
            and type(x) is torch.Tensor
            and x.requires_grad
            and x.dim() >= 1
            and frozen_half(weight, 2)
            and x.dtype == weight.dtype
            and x.numel() // max(x.shape[-1], 1) <= ROW_BACKWARD_MAX_ROWS
            and (bias is None or type(bias) in plain)
        ):
            return None
        return RowBackwardLinear.apply(x, weight, bias)

    def fold_by_expert(args: Any, kwargs: Any) -> Any:
        bound: dict[str, Any] = dict(zip(("input", "batch1", "batch2"), args, strict=False), **kwargs)
        weight: Any = bound.get("input")
        lhs: Any = bound.get("batch1")
        rhs: Any = bound.get("batch2")
        alpha = bound.get("alpha", 1)
        if not (
            set(bound) <= {"input", "batch1", "batch2", "alpha"}
            and len(args) <= 3
            and isinstance(alpha, (int, float))
            and frozen_half(weight, 3)
            and all(type(t) is torch.Tensor and t.dtype == weight.dtype and t.device == weight.device for t in (lhs, rhs))
        ):
            return None
        return ExpertwiseFold.apply(weight, lhs, rhs, float(alpha))

    routes = {linear: linear_by_rows, baddbmm: fold_by_expert}

    class HalfPrecisionProducts(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            route = routes.get(func)
            if route is not None and torch.is_grad_enabled():
                out = route(args, kwargs)
                if out is not None:
                    return out
            return func(*args, **kwargs)

    return HalfPrecisionProducts()


# --- the pass ------------------------------------------------------------------------------------


def _entering(in_flight: list[str], name: str) -> Callable[[Any, Any], None]:
    def hook(module: Any, args: Any) -> None:  # a hook that returns a value would replace the input or output
        in_flight.append(name)

    return hook


def _leaving(in_flight: list[str]) -> Callable[[Any, Any, Any], None]:
    def hook(module: Any, args: Any, output: Any) -> None:
        if in_flight:
            in_flight.pop()

    return hook


class _Broke(Exception):
    def __init__(self, exc: BaseException, module: str | None) -> None:
        super().__init__(str(exc))
        self.exc, self.module = exc, module


def _loss(peft_model: Any, ids: Any, columns: Callable[[Any], Any] | None) -> Any:
    """The causal-LM loss over the whole vocabulary, or (sliced head) over the columns it scores."""
    import torch

    if columns is None:
        return peft_model(input_ids=ids, labels=ids, use_cache=False).loss
    logits = peft_model(input_ids=ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), columns(ids[:, 1:]).flatten())


def _one_pass(peft_model: Any, ids: Any, backward: bool, columns: Callable[[Any], Any] | None) -> float:
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
        with half_precision_products():
            loss = _loss(peft_model, ids, columns)
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


def _attempt(peft_model: Any, ids: Any, backward: bool, layers: Any, chosen: list[int] | None, slice_head: bool) -> tuple[float, bool]:
    """One pass on the chosen layers (None: all) with the head sliced or whole; (loss, head was sliced)."""
    with contextlib.ExitStack() as stack:
        if chosen is not None:
            stack.enter_context(only_layers(peft_model, layers, chosen))
        columns = stack.enter_context(sliced_head(peft_model, ids)) if slice_head else None
        return _one_pass(peft_model, ids, backward, columns), columns is not None


def run_check(peft_model: Any, tokenizer: Any, *, backward: bool = True) -> CheckRecord:
    """Forward (and backward) on a few tokens through one layer of each kind and a slice of the head; raises
    InvalidInput naming the LoRA module that broke the model."""
    started = time.perf_counter()
    was_training = peft_model.training
    peft_model.eval()  # no dropout: the check is deterministic; gradients still flow
    _keep_kbit_layers_training(peft_model)
    ids = _ids(tokenizer, peft_model.get_input_embeddings().weight.device)
    layers = decoder_layers(peft_model)
    total = len(layers) if layers is not None else 0
    # Cheapest first; a failure inside a LoRA layer is the answer on any of them, any other failure means the
    # shortened model (or the sliced head) cannot run this architecture: try the next, the last is the whole model.
    attempts: list[tuple[list[int] | None, bool]] = (
        [(one_of_each_kind(layers), True), (one_of_each_kind(layers), False)] if layers is not None else []
    )
    attempts += [(None, True), (None, False)]
    try:
        for i, (chosen, slice_head) in enumerate(attempts):
            try:
                loss, sliced = _attempt(peft_model, ids, backward, layers, chosen, slice_head)
                ran = len(chosen) if chosen is not None else total
                break
            except _Broke as broke:
                if broke.module or i == len(attempts) - 1:
                    raise _refusal(broke) from broke.exc
    finally:
        peft_model.train(was_training)
    head = _base(peft_model).get_output_embeddings()
    return CheckRecord(
        forward=True,
        backward=backward,
        tokens=int(ids.shape[1]),
        layers=ran,
        layers_total=total,
        head_rows=len(_head_rows(head, ids)) if sliced else None,
        loss=round(loss, 6),
        seconds=round(time.perf_counter() - started, 3),
    )


def skipped() -> CheckRecord:
    return CheckRecord(forward=False, backward=False, tokens=0, loss=None, seconds=0.0)
