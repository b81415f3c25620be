"""DoRA/LoRA on one parameter (PEFT's ``target_parameters``): a 2-D weight, or a 3-D stack of experts.

transformers 5 keeps a mixture-of-experts layer's experts as 3-D parameters of one module:

    Qwen3-MoE, Mixtral, OLMoE ...   gate_up_proj [E, 2I, H], down_proj [E, H, I]     stored [E, out, in]
    gpt-oss (is_transposed=True)     gate_up_proj [E, H, 2I], down_proj [E, I, H]     stored [E, in, out]

Expert e computes x @ W_e^T (as rows [out, in]). Per expert, DoRA (Liu et al. 2024, section 4) is

    W_e' = m_e * (W_e + s B_e A_e) / ||W_e + s B_e A_e||_row          m: [E, out]

One ``ParameterAdapter`` adapts one parameter, in the layout of PEFT's ``lora.ParamWrapper`` so that
adapter files are PEFT's own (the LoRA case loads in PEFT, and PEFT's loads here):

    lora_A.weight [E*r, in]    read as [E, r, in]
    lora_B.weight [out, E*r]   read as [out, r, E]   (column j*E + e is rank j of expert e)
    lora_magnitude_vector [E, out]   (DoRA; [out] for a 2-D parameter; PEFT has no DoRA here)

Two parameters of one module nest as PEFT's wrappers do: the parameter registered later wraps the
adapter of the earlier one (``experts.lora_A`` is down_proj's, ``experts.base_layer.lora_A``
gate_up_proj's). The outermost adapter runs the module:

- routed (``layers.routed``): a module of transformers' experts convention whose adapted parameters
  are its projections. The base matmul and the LoRA branch run per expert on the tokens routed to
  it, composed as in ``functional.dora_compose``; the norm is the factored one batched over experts
  (``functional_experts``), cached until A, B or the base change. No [E, out, in] tensor is built.
- otherwise (a 2-D parameter such as a router weight, or an unknown module): the module's own
  forward with the adapted parameter substituted (``torch.func.functional_call``), which builds one
  parameter-sized tensor per forward, like PEFT; adapter dropout cannot apply to a weight and is refused.

The output axis of a 3-D parameter follows transformers' flag ``is_transposed`` (PEFT's rule); a
module without it is read as [E, out, in].
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .. import functional_experts as F_experts
from .base import AdapterLayer
from .routed import PROJECTIONS, is_expert_module, routed_experts_forward


class PassesAttributes:
    """Mixin for wrappers of modules whose surroundings read their attributes (the block around the
    experts reads num_experts; nn.TransformerEncoderLayer reads batch_first, num_heads, ...): a public
    name the wrapper does not have is the wrapped module's."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)


def parameter_owner(module: nn.Module) -> nn.Module:
    """The module that holds the parameters, under any nesting of ``ParameterAdapter``s."""
    while isinstance(module, ParameterAdapter):
        module = module.base_layer
    return module


class ParameterAdapter(PassesAttributes, AdapterLayer):
    """Adapter of the parameter ``parameter_name`` of ``parameter_owner(base_layer)``.

    Attributes (besides ``AdapterLayer``'s): parameter_name; num_experts (1 for a 2-D parameter);
    stacked (3-D); transposed (stored [E, in, out]); routed (the expert projections' fast path).
    """

    def __init__(self, base_layer: nn.Module, *, parameter_name: str, **kwargs) -> None:
        owner = parameter_owner(base_layer)
        param = getattr(owner, parameter_name, None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"{type(owner).__name__} has no parameter named {parameter_name!r}.")
        if param.dim() not in (2, 3):
            raise ValueError(
                f"Parameter {parameter_name!r} of {type(owner).__name__} has shape {list(param.shape)}; only 2-D "
                "([out, in]) and 3-D ([experts, out, in]) parameters can take an adapter."
            )
        self.parameter_name = parameter_name
        self.stacked = param.dim() == 3
        self.num_experts = param.shape[0] if self.stacked else 1
        self.transposed = self.stacked and bool(getattr(owner, "is_transposed", False))
        self.routed = self.stacked and parameter_name in PROJECTIONS and is_expert_module(owner)
        if self.stacked and kwargs.get("use_dora", True) and not hasattr(owner, "is_transposed"):
            warnings.warn(
                f"{type(owner).__name__} does not say how it stores {parameter_name!r} (transformers' is_transposed); "
                f"it is read as [experts, out, in] (PEFT's rule), so DoRA's magnitude runs over dim 1 of "
                f"{list(param.shape)}. If that module computes x @ W[e], that is its input axis.", stacklevel=4)
        super().__init__(owner, **kwargs)  # built on the owner; re-nested below (AdapterLayer refuses adapters)
        self.base_layer = base_layer
        if not isinstance(self.lora_dropout, nn.Identity) and not all(layer.routed for layer in self.chain()):
            raise ValueError(
                f"lora_dropout={kwargs.get('lora_dropout')} cannot apply to parameter {parameter_name!r} of "
                f"{type(owner).__name__}: its module reads the parameter itself, so the adapter works on the weight, "
                "not on an input. Set lora_dropout=0 (PEFT refuses dropout on target_parameters too)."
            )

    # ---- nesting --------------------------------------------------------------------------------
    def chain(self) -> list[ParameterAdapter]:
        """This adapter and the ones it wraps, outermost first."""
        layers, module = [self], self.base_layer
        while isinstance(module, ParameterAdapter):
            layers.append(module)
            module = module.base_layer
        return layers

    @property
    def owner(self) -> nn.Module:
        return parameter_owner(self.base_layer)

    # ---- the layout (see the module docstring) --------------------------------------------------
    def base_weight(self) -> Tensor:
        return getattr(self.owner, self.parameter_name)

    @property
    def weight(self) -> Tensor:
        return self.base_weight()

    @property
    def bias(self) -> None:
        return None  # the adapter never scales a bias; an expert bias is the module's own

    def weight_rows(self, weight: Tensor) -> Tensor:
        if self.stacked and self.transposed:
            return weight.transpose(1, 2)  # [E, out, in], a view
        return weight  # [out, in] or [E, out, in]

    @property
    def out_features(self) -> int:
        return self.weight_rows(self.base_weight()).shape[-2]

    @property
    def in_features(self) -> int:
        return self.weight_rows(self.base_weight()).shape[-1]

    def create_adapter(self, r: int, *, device: torch.device, dtype: torch.dtype) -> None:
        experts = self.num_experts
        self.lora_A = nn.Linear(self.in_features, r * experts, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r * experts, self.out_features, bias=False, device=device, dtype=dtype)

    def lora_A_rows(self) -> Tensor:
        a = self.lora_A.weight
        return a.view(self.num_experts, self.r, a.shape[-1]) if self.stacked else a  # [E, r, in]

    def lora_B_rows(self) -> Tensor:
        b = self.lora_B.weight
        if not self.stacked:
            return b
        return b.view(b.shape[0], self.r, self.num_experts).permute(2, 0, 1)  # [out, r, E] -> [E, out, r]

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.num_experts, self.out_features) if self.stacked else (self.out_features,)

    # ---- norm, scale, adapted weight --------------------------------------------------------------
    def base_sq_norms(self) -> Tensor:
        if not self.stacked:
            return super().base_sq_norms()
        if self.merged:
            raise RuntimeError("The base weight holds the merged adapter; unmerge() first.")
        weight = self.base_weight()
        return self._cached("base_sq", (weight,),
                            lambda: F_experts.expert_squared_row_norms(self.base_rows(weight)))

    def row_norm(self) -> Tensor:
        """||W_e + s B_e A_e||_row, fp32 [E, out] ([out] for 2-D), detached; cached (``AdapterLayer._cached``)."""
        if not self.stacked:
            return super().row_norm()
        weight = self.base_weight()

        def compute() -> Tensor:
            return F_experts.expert_row_norm(self.base_rows(weight), self.lora_A_rows(), self.lora_B_rows(),
                                             self.scaling, base_sq=self.base_sq_norms())

        return self._cached("row_norm", (weight, *self.lora_params()), compute, extra=(self.scaling,))

    def dora_scale(self, norm: Tensor | None = None) -> Tensor:
        """g = m / ||W + s B A||_row in the magnitude's shape ([E, out] or [out])."""
        norm = self.row_norm() if norm is None else norm
        magnitude = self.lora_magnitude_vector
        return magnitude / norm.reshape(magnitude.shape).to(magnitude.dtype)

    def routed_terms(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """What the routed forward needs: A [E, r, in], B scaled by s (LoRA) or by g*s (DoRA)
        [E, out, r], and g [E, out] (None for LoRA). Small tensors: no [E, out, in] one."""
        a, b = self.lora_A_rows(), self.lora_B_rows()
        if not self.use_dora:
            return a, (b * self.scaling).contiguous(), None
        g = self.dora_scale()
        return a, (b * (g * self.scaling).unsqueeze(-1).to(b.dtype)).contiguous(), g

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        active = [layer for layer in self.chain() if not (layer.disabled or layer.merged)]
        owner = self.owner
        if not active:
            return owner(*args, **kwargs)
        if all(layer.routed for layer in self.chain()):
            return routed_experts_forward(owner, {layer.parameter_name: layer for layer in active}, args, kwargs)
        substitutes = {layer.parameter_name: adapted_weight(layer) for layer in active}
        return torch.func.functional_call(owner, substitutes, args, kwargs, strict=False)

    # ---- merge ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_into(self, weight: Tensor) -> dict[str, Tensor]:
        if not self.stacked:
            return super().merge_into(weight)
        magnitude = self.lora_magnitude_vector if self.use_dora else None
        return F_experts.merge_experts_(self.weight_rows(weight), self.lora_A_rows(), self.lora_B_rows(),
                                        self.scaling, magnitude)

    @torch.no_grad()
    def unmerge_from(self, weight: Tensor, norms: dict[str, Tensor]) -> None:
        if not self.stacked:
            return super().unmerge_from(weight, norms)
        base_norm = norms.get("base_row_norm")
        F_experts.unmerge_experts_(
            self.weight_rows(weight), self.lora_A_rows(), self.lora_B_rows(), self.scaling,
            self.lora_magnitude_vector if self.use_dora else None, merge_norm=norms.get("row_norm"),
            base_sq=None if base_norm is None else base_norm.square(),
        )

    def _check_vector(self, v: Tensor) -> Tensor:
        if not self.stacked:
            return super()._check_vector(v)
        shape = self.magnitude_shape()
        if v.numel() != shape[0] * shape[1]:
            raise ValueError(f"Expected {shape[0]} x {shape[1]} row norms (experts x out) for this parameter, "
                             f"got {list(v.shape)}.")
        return v.detach().reshape(shape).to(device=self.base_weight().device, dtype=torch.float64)

    def extra_repr(self) -> str:
        experts = f", experts={self.num_experts}" if self.stacked else ""
        path = "routed" if self.routed else "substituted"
        return f"parameter_name={self.parameter_name!r}{experts}, {path}, {super().extra_repr()}"


def adapted_weight(layer: AdapterLayer) -> Tensor:
    """The base weight ``layer`` computes with, adapter applied (differentiable in A, B and m), in the
    weight's stored layout and dtype: for modules whose forward reads their weights themselves."""
    weight = layer.base_weight()
    scale = layer.dora_scale() if layer.use_dora else None
    rows = F_experts.adapted_weight(layer.weight_rows(weight), layer.lora_A_rows(), layer.lora_B_rows(),
                                    layer.scaling, scale)
    return layer.weight_rows(rows).to(weight.dtype)  # the row view is its own inverse (identity or a transpose)


def describe_expert_mismatch(layer: ParameterAdapter, name: str, shape: tuple[int, ...]) -> str | None:
    """A clear message when a file's tensor for ``layer`` fits another number of experts, else None."""
    if not layer.stacked:
        return None
    if name == "lora_magnitude_vector" and len(shape) == 2 and shape[0] != layer.num_experts:
        count = shape[0]
    elif name == "lora_A.weight" and len(shape) == 2 and shape[0] % layer.r == 0 and shape[0] != layer.lora_A.weight.shape[0]:
        count = shape[0] // layer.r
    elif name == "lora_B.weight" and len(shape) == 2 and shape[1] % layer.r == 0 and shape[1] != layer.lora_B.weight.shape[1]:
        count = shape[1] // layer.r
    else:
        return None
    return (f"the adapter was made for {count} experts but this model's '{layer.parameter_name}' has "
            f"{layer.num_experts} (rank {layer.r}): load it onto the model it was trained on")
