"""The forward of a transformers mixture-of-experts module with adapters on its expert projections.

transformers 5 decorates its expert modules with ``use_experts_implementation``; every such module
(Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, gpt-oss, ...) has the same parts, which its "eager",
"batched_mm" and "grouped_mm" implementations all read:

    gate_up_proj (has_gate) or up_proj, down_proj   [E, out, in], or [E, in, out] when is_transposed
    gate_up_proj_bias / up_proj_bias, down_proj_bias   [E, out] when has_bias
    _apply_gate(gate_up) (has_gate) or act_fn(up);  post_expert_norm when has_post_expert_norm
    forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]

The adapters act inside that computation, at the level of one expert applied to its tokens:
tokens are grouped by expert (as grouped_mm does), and each expert's projection is

    y = g_e * (x W_e^T) + [(g_e s) B_e] (A_e x) + b_e           (DoRA; functional.dora_compose)
    y = x W_e^T + [s B_e] (A_e x) + b_e                          (LoRA)

with its own W_e, A_e, B_e and g_e = m_e / ||W_e + s B_e A_e||_row (the bias is never scaled). The
routing weights, the gate and the sum over the top-k experts are the module's. One host sync per
call reads the token count of each expert; no [E, out, in] tensor exists at any point.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn


PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def is_expert_module(module: nn.Module) -> bool:
    """A module of transformers' experts convention (see the module docstring)."""
    flags = ("num_experts", "is_transposed", "has_gate", "has_bias")
    return all(hasattr(module, name) for name in flags) and isinstance(getattr(module, "down_proj", None), Tensor) \
        and callable(getattr(module, "_apply_gate", None))


def routing_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden_states, top_k_index, top_k_weights) from a call of ``module``, whatever its forward
    names them (gpt-oss: router_indices, routing_weights)."""
    bound = _forward_signature(type(module)).bind(module, *args, **kwargs)
    values = list(bound.arguments.values())[1:]  # without self
    if len(values) < 3 or any(v is None for v in values[:3]):
        raise ValueError(f"{type(module).__name__} was called without its routing (hidden states, top-k expert "
                         "indices and weights); dorakit's expert adapters need all three.")
    return values[0], values[1], values[2]


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    """The signature of ``cls.forward`` (self included), read once per class: every forward binds to it."""
    return inspect.signature(cls.forward)


def routed_experts_forward(module: nn.Module, adapters: dict, args: tuple, kwargs: dict) -> Tensor:
    """``module``'s output with the given adapters ({parameter name: ParameterAdapter}) on its projections.

    Args:
        module: the experts module (its own parameters are the frozen base).
        adapters: the active adapters by parameter name; projections without one run as the base.
        args, kwargs: the call, as the block around the experts made it.
    Returns:
        [T, H] as the module's own forward returns it.
    """
    hidden_states, top_k_index, top_k_weights = routing_inputs(module, args, kwargs)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])  # (T, H)
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)  # (S,), S = T * top_k token-expert pairs
    order = torch.argsort(expert_ids, stable=True)  # pairs grouped by expert; EP sentinels (id >= E) last
    counts = torch.bincount(expert_ids, minlength=module.num_experts)[: module.num_experts].tolist()  # host sync
    kept = order[: sum(counts)]
    routed = x[kept // top_k]  # (S', H), expert by expert

    up = "gate_up_proj" if module.has_gate else "up_proj"
    hidden = project(module, up, routed, counts, adapters.get(up))  # (S', 2I) or (S', I)
    hidden = module._apply_gate(hidden) if module.has_gate else module.act_fn(hidden)  # (S', I)
    out = project(module, "down_proj", hidden, counts, adapters.get("down_proj"))  # (S', H)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[kept].unsqueeze(-1)  # routing weights, as the module applies them
    # Back to (token, k) order, then the deterministic sum over the top-k experts (grouped_mm's way).
    pairs = out.new_zeros(expert_ids.shape[0], out.shape[-1]).index_put((kept,), out)  # (S, H)
    result = pairs.view(-1, top_k, out.shape[-1]).sum(dim=1)  # (T, H)
    return result.to(hidden_states.dtype).reshape(shape)


def project(module: nn.Module, name: str, x: Tensor, counts: list[int], adapter) -> Tensor:
    """One projection of every expert on its rows of ``x`` (grouped by expert, ``counts`` each)."""
    weight = getattr(module, name)
    rows = weight.transpose(1, 2) if module.is_transposed else weight  # (E, out, in), a view
    bias = getattr(module, f"{name}_bias") if module.has_bias else None  # (E, out)
    terms: list = [None] * len(counts)
    if adapter is not None:
        # Per-expert views by unbind: its backward stacks the gradients once, where indexing per expert
        # would scatter each expert's gradient into a zero tensor of the whole stack (E^2 work).
        a, scaled_b, g = adapter.routed_terms()
        terms = list(zip(a.unbind(0), scaled_b.unbind(0), terms if g is None else g.unbind(0)))
    parts, start = [], 0
    for e, (n, expert_terms) in enumerate(zip(counts, terms)):
        if n == 0:
            continue
        xe = x[start:start + n]  # (n, in): the tokens routed to expert e
        start += n
        y = expert_linear(xe, rows[e], adapter, expert_terms)
        parts.append(y if bias is None else y + bias[e])
    if not parts:
        return x.new_zeros(0, rows.shape[1])
    return torch.cat(parts)


def expert_linear(x: Tensor, weight: Tensor, adapter, terms: tuple | None) -> Tensor:
    """x W^T for one expert, with its adapter (A [r, in], scaled B [out, r], g [out] or None); no bias."""
    base = F.linear(x.to(weight.dtype), weight)  # (n, out)
    if terms is None:
        return base
    a, scaled_b, g = terms
    dropped = adapter.lora_dropout(x.to(a.dtype) if x.is_floating_point() else x)
    lora = F.linear(F.linear(dropped, a), scaled_b)  # (n, out): [(g s) B] (A x'), or [s B] (A x')
    # functional.dora_compose's forms, written in place into the LoRA branch's output (a fresh tensor no
    # backward needs), which saves one (n, out) allocation per expert.
    if g is None:
        out = lora.add_(base.to(lora.dtype))
    elif adapter.training and not isinstance(adapter.lora_dropout, nn.Identity):
        # y = x W^T + (g - 1) x' W^T + [(g s) B] A x' (paper and PEFT with dropout): a second base matmul.
        base_dropped = F.linear(dropped.to(weight.dtype), weight)
        out = lora.add_(base.to(lora.dtype)).addcmul_(base_dropped.to(lora.dtype), g - 1)
    else:
        out = lora.addcmul_(base.to(lora.dtype), g)  # g * base + [(g s) B] A x
    return out.to(base.dtype)
