"""What every adapted layer shares: the LoRA pair, the DoRA magnitude, forward, merge and unmerge.

    x ──> base_layer ──────────────────────────────┐ base_out = x W0^T + b
    │                                               v
    └─> dropout ─> A ─> B ──> * s ──> (+) ──> * g ──> (+ b) ──> y        g = m / ||W0 + s B A||_row
                                                                           (g = 1 for plain LoRA)

A subclass only says how its base weight looks as a matrix of output rows ([out, in]), how the
LoRA branch runs on an input, and how a per-channel vector broadcasts over its output. The math
itself lives in ``dorakit.functional`` so that layers, merge, analysis and benchmarks agree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as F_dora
from .. import norm_cache


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters over a half-precision base are kept in fp32 (as PEFT does by default): their updates
    are tiny relative to the weights and would round away in bf16. Otherwise they follow the base."""
    if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point:
        return torch.float32
    return base_dtype


# Fused kernels for the row norm and the composition (issue 18). ``dorakit.kernels`` installs its
# dispatcher here (the core imports no wing); its methods return None wherever they do not apply (not
# CUDA, no Triton, under torch.compile), and the dorakit.functional twins run instead.
_kernels = None


def use_kernels(dispatcher) -> None:
    """Install the object whose ``row_norm`` and ``compose`` the layers try first (None: PyTorch only)."""
    global _kernels
    _kernels = dispatcher


def _try_kernel(name: str, *args):
    return None if _kernels is None else getattr(_kernels, name)(*args)


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class AdapterLayer(nn.Module):
    """Base class of dorakit's wrappers. ``use_dora=False`` gives plain LoRA through the same code.

    Attributes:
        base_layer: the original module, untouched until ``merge()``.
        r, lora_alpha, scaling: rank, alpha and s = alpha / r (alpha / sqrt(r) with rsLoRA).
        lora_magnitude_vector: DoRA's trainable magnitude m (PEFT's shape), or None for LoRA.
        merged: whether the adapter is folded into ``base_layer``'s weight.
        disabled: when True the layer behaves as ``base_layer`` (see ``dorakit.disable_adapters``).
    """

    # Subclasses that take integer inputs (embeddings) do not apply dropout, as in PEFT.
    supports_dropout = True
    # Memoise the norm between optimizer steps (see `_cached`). Off under FSDP2, whose unsharded
    # parameters are fresh tensors each forward with version 0: a reused address could look unchanged.
    cache_norms = True

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_dora: bool = True,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_hyperparameters(r, lora_alpha, lora_dropout, init_lora_weights)
        if isinstance(base_layer, AdapterLayer):
            raise ValueError(
                f"This {type(base_layer.base_layer).__name__} already has an adapter. Call "
                "dorakit.unload(model) or dorakit.merge_and_unload(model) before adding another."
            )
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = F_dora.lora_scaling(r, lora_alpha, use_rslora)
        self.use_dora = use_dora
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 and self.supports_dropout else nn.Identity()
        self.merged = False
        self.disabled = False
        # While merged (DoRA): {"row_norm": ||W0 + sBA||_row, which undoes the merge exactly,
        # "base_row_norm": ||W0||_row, which checks that undo}, [out] each, as files carry them.
        self._merged_norms: dict[str, Tensor] = {}
        # Derived tensors cached until their inputs change: name -> (key, value). See `_cached`.
        self._cache: dict[str, tuple] = {}
        norm_cache.watch_optimizers()

        weight = self.base_weight()
        dtype = adapter_dtype or default_adapter_dtype(weight.dtype)
        self.create_adapter(r, device=weight.device, dtype=dtype)
        self.reset_adapter(init_lora_weights)
        if use_dora:
            # Identity at init: m = ||W0 + s B A||_row makes W' = W0 exactly when B = 0.
            norm = self.row_norm()
            self.lora_magnitude_vector = nn.Parameter(norm.to(dtype).reshape(self.magnitude_shape()))
        else:
            self.register_parameter("lora_magnitude_vector", None)

    # ---- what a subclass provides -------------------------------------------------------------
    def create_adapter(self, r: int, *, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def reset_adapter(self, init_lora_weights: bool | str) -> None:
        """Initialise ``lora_A``/``lora_B`` modules (Linear and Conv; Embedding overrides)."""
        if init_lora_weights is False:
            return  # both factors keep their modules' random init: a non-identity start, for tests
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            else:
                # A as nn.Linear's default, B zero (loralib): the adapted model starts as the base.
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def weight_rows(self, weight: Tensor) -> Tensor:
        """The base weight as [out, in] (a view wherever the layout allows)."""
        raise NotImplementedError

    def lora_A_rows(self) -> Tensor:
        """A as [r, in], matching ``weight_rows``."""
        raise NotImplementedError

    def lora_B_rows(self) -> Tensor:
        """B as [out, r], matching ``weight_rows``."""
        raise NotImplementedError

    def lora_A_forward(self, x: Tensor) -> Tensor:
        """A(x): the adapter's [..., r] hidden state."""
        raise NotImplementedError

    def lora_B_weight(self) -> Tensor:
        """The tensor holding B, in its own layout ([out, r, ...])."""
        raise NotImplementedError

    def lora_B_forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """B applied to the hidden state with the given (scaled) weight and optional bias."""
        raise NotImplementedError

    def base_forward_without_bias(self, x: Tensor) -> Tensor:
        """x W0^T with the base layer's own operator, for the dropout path."""
        raise NotImplementedError

    def channel_view(self, v: Tensor) -> Tensor:
        """Reshape a per-output-channel vector [out] to broadcast over this layer's output."""
        return v

    def magnitude_shape(self) -> tuple[int, ...]:
        """Shape of ``lora_magnitude_vector`` (PEFT's, so state dicts map by key alone)."""
        return (self.out_features,)

    # ---- shared machinery ---------------------------------------------------------------------
    def base_weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def weight(self) -> Tensor:
        # Models sometimes read `.weight` of their submodules (dtype checks, weight tying).
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def out_features(self) -> int:
        return self.weight_rows(self.base_weight()).shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_rows(self.base_weight()).shape[1]

    def adapter_dtype(self) -> torch.dtype:
        return self.lora_A_rows().dtype

    def lora_params(self) -> tuple[Tensor, Tensor]:
        """The tensors holding A and B (what the norm depends on besides the base weight)."""
        return self.lora_A.weight, self.lora_B.weight

    def _cached(self, name: str, inputs: tuple[Tensor, ...], compute, extra: tuple = ()):
        """``compute()`` memoised until any of ``inputs`` may have changed.

        The key (``dorakit.norm_cache.cache_key``) combines every optimizer step of the process (fused
        optimizers write without bumping version counters), each tensor's version counter (in-place
        writes: ``copy_``, ``load_state_dict``) and its storage (``.data`` reassignment); the module
        docstring of ``norm_cache`` states the guarantee and its one gap. So the norm is computed once
        per optimizer step in training (gradient accumulation and checkpoint recomputation reuse it)
        and once in total for inference, until the adapter changes.
        """
        if torch.compiler.is_compiling():
            return compute()  # inside a compiled graph: traced and fused, no Python-side cache
        if not self.cache_norms and name != "base_sq":  # the frozen base's norms cannot go stale
            return compute()
        key = norm_cache.cache_key(inputs, extra)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            # A tensor made under inference_mode may not be saved for a later backward.
            values = hit[1] if isinstance(hit[1], tuple) else (hit[1],)
            stale = any(v is not None and v.is_inference() for v in values) and not torch.is_inference_mode_enabled()
            if not stale:
                return hit[1]
        value = compute()
        self._cache[name] = (key, value)
        return value

    def base_rows(self, weight: Tensor):
        """What the norm reads the base weight through: its [out, in] row view (a quantized layer
        hands a reader that dequantizes requested rows only)."""
        return self.weight_rows(weight.detach())

    def merged_base(self) -> nn.Module:
        """The module that replaces this layer in ``merge_and_unload``: the base layer with the
        adapter merged into its weight (a quantized layer returns a full-precision copy instead)."""
        self.merge()
        return self.base_layer

    def base_sq_norms(self) -> Tensor:
        """||W0_i||^2 in fp32, cached while the base weight is unchanged."""
        if self.merged:
            raise RuntimeError("The base weight holds the merged adapter; unmerge() first.")
        weight = self.base_weight()
        return self._cached("base_sq", (weight,), lambda: F_dora.squared_row_norms(self.base_rows(weight)))

    def row_norm(self) -> Tensor:
        """||W0 + s B A||_row, fp32 [out], detached (paper section 4.3); cached until A, B or the
        base weight change."""
        weight = self.base_weight()

        def compute() -> Tensor:
            rows, lora_A, lora_B, base_sq = self.base_rows(weight), self.lora_A_rows(), self.lora_B_rows(), self.base_sq_norms()
            fused = _try_kernel("row_norm", rows, lora_A, lora_B, self.scaling, base_sq)
            return F_dora.dora_row_norm(rows, lora_A, lora_B, self.scaling, base_sq=base_sq) if fused is None else fused

        return self._cached("row_norm", (weight, *self.lora_params()), compute, extra=(self.scaling,))

    def dora_scale(self, norm: Tensor | None = None) -> Tensor:
        """g = m / ||W0 + s B A||_row as [out] (the cached norm unless ``norm`` is given); gradients
        reach m, not the norm."""
        magnitude = self.lora_magnitude_vector.reshape(-1)
        norm = self.row_norm() if norm is None else norm
        return magnitude / norm.to(magnitude.dtype)

    def cast_input(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            return x.to(self.adapter_dtype())
        return x

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        return self.adapted_output(x, result)

    def adapted_output(self, x: Tensor, result: Tensor, scale: Tensor | None = None) -> Tensor:
        """The layer's output from its input ``x`` and the base layer's output ``result``.
        ``scale``: DoRA's g ([out]) when the caller already has the norm (a quantized layer computes
        it in the same pass as ``result``); otherwise it comes from the cached norm."""
        x_adapter = self.lora_dropout(self.cast_input(x))
        hidden = self.lora_A_forward(x_adapter)  # [..., r]
        weight_b = self.lora_B_weight()
        if not self.use_dora:
            # One fused op over the output (PEFT's LoRA takes two: scale, then add).
            lora_out = self.lora_B_forward(hidden, weight_b)
            return torch.add(result.to(lora_out.dtype), lora_out, alpha=self.scaling).to(result.dtype)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            scale = self.dora_scale()  # [out]
            lora_out = self.lora_B_forward(hidden, F_dora.scaled_lora_B(weight_b, scale, self.scaling))
            base_dropped = self.base_forward_without_bias(x_adapter)
            out = F_dora.dora_compose(result, lora_out, self.channel_view(scale), base_dropped=base_dropped)
        else:
            # x' = x: the base output is reused, no second base matmul (DORA.md).
            scale, scaled_b, correction = self._fused_terms(weight_b, scale)
            lora_out = self.lora_B_forward(hidden, scaled_b, correction)
            fused = _try_kernel("compose", result, lora_out, self.channel_view(scale))
            if fused is not None:
                return fused
            out = F_dora.dora_compose(result, lora_out, self.channel_view(scale))
        return out.to(result.dtype)

    def _fused_terms(self, weight_b: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """g, (g*s) B and b (1 - g); without autograd (inference) cached until anything they depend
        on changes, so unmerged inference costs what LoRA's does. A given ``scale`` is used as g."""

        def compute():
            g = self.dora_scale() if scale is None else scale
            return g, F_dora.scaled_lora_B(weight_b, g, self.scaling), F_dora.bias_correction(self.bias, g)

        if torch.is_grad_enabled() or scale is not None:
            return compute()
        inputs = (self.base_weight(), *self.lora_params(), self.lora_magnitude_vector)
        if self.bias is not None:
            inputs += (self.bias,)
        return self._cached("fused_terms", inputs, compute, extra=(self.scaling,))

    def _write_back(self, weight: Tensor, rows: Tensor) -> None:
        if not _shares_storage(weight, rows):  # the rows were a copy (e.g. a channels-last conv)
            weight.copy_(rows.reshape(weight.shape))

    @torch.no_grad()
    def merge_into(self, weight: Tensor, norm: Tensor | None = None) -> dict[str, Tensor]:
        """Fold the adapter into ``weight`` in place: the base weight itself, or a copy of it (a
        merged checkpoint is written from copies). Returns the norms that undo it (DoRA; fp64).
        ``norm``: the row norm m is divided by when it is not ``weight``'s own (see
        ``functional.merge_rows_``); only it is returned then."""
        rows = self.weight_rows(weight)
        terms = F_dora.merge_rows_(
            rows, self.lora_A_rows(), self.lora_B_rows(), self.scaling, self.lora_magnitude_vector, norm=norm
        )
        self._write_back(weight, rows)
        if not self.use_dora:
            return {}
        if norm is not None:
            return {"row_norm": norm.reshape(-1).to(terms.base_sq.dtype)}
        return {"row_norm": F_dora.norm_from_terms(terms, self.scaling), "base_row_norm": terms.base_sq.sqrt()}

    def merge(self) -> None:
        """Fold the adapter into the base weight. Idempotent: merging a merged layer does nothing."""
        if self.merged:
            return
        self._merged_norms = self.merge_into(self.base_weight().detach())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly. Idempotent: unmerging an unmerged layer does nothing.

        DoRA needs only the row norms recorded by ``merge()``, or given with ``set_merged`` after a
        merged checkpoint was loaded in another process: no copy of the old weight is kept.
        """
        if not self.merged:
            return
        self.unmerge_from(self.base_weight().detach(), self._merged_norms)
        self._merged_norms = {}
        self.merged = False

    @torch.no_grad()
    def unmerge_from(self, weight: Tensor, norms: dict[str, Tensor]) -> None:
        """Undo ``merge_into`` on ``weight`` in place, from the norms it returned (see ``unmerge``)."""
        rows = self.weight_rows(weight)
        base_norm = norms.get("base_row_norm")
        F_dora.unmerge_rows_(
            rows,
            self.lora_A_rows(),
            self.lora_B_rows(),
            self.scaling,
            self.lora_magnitude_vector,
            merge_norm=norms.get("row_norm"),
            base_sq=None if base_norm is None else base_norm.square(),
        )
        self._write_back(weight, rows)

    def merged_row_norms(self) -> dict[str, Tensor]:
        """While merged with DoRA: ``{"row_norm": ||W0 + sBA||_row, "base_row_norm": ||W0||_row}``,
        fp32 [out] each, to store with a merged checkpoint; empty otherwise."""
        return {name: v.float() for name, v in self._merged_norms.items()}

    def set_merged(self, row_norm: Tensor | None = None, base_row_norm: Tensor | None = None) -> None:
        """Declare that the base weight already holds this adapter merged (a merged checkpoint was
        loaded), so that ``unmerge()`` can restore the base. DoRA needs ``row_norm`` or
        ``base_row_norm`` from ``merged_row_norms()`` of the process that merged (both is best:
        the second then checks the first)."""
        if self.use_dora:
            if row_norm is None and base_row_norm is None:
                raise ValueError("A merged DoRA layer needs the row norms saved at merge time to unmerge.")
            given = {"row_norm": row_norm, "base_row_norm": base_row_norm}
            self._merged_norms = {name: self._check_vector(v) for name, v in given.items() if v is not None}
        self.merged = True

    @property
    def magnitude_size(self) -> int:
        """Entries of the magnitude (and of the norms that undo a merge): one per output row."""
        return self.out_features

    norm_kind = "row"  # what one norm is taken over, for messages

    def _check_vector(self, v: Tensor) -> Tensor:
        v = v.detach().reshape(-1).to(device=self.base_weight().device, dtype=torch.float64)
        if v.numel() != self.magnitude_size:
            raise ValueError(f"Expected {self.magnitude_size} {self.norm_kind} norms for this layer, got {v.numel()}.")
        return v

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        return f"{kind}: r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"


def check_hyperparameters(r: int, lora_alpha: float, lora_dropout: float, init_lora_weights: bool | str) -> None:
    """Raise ValueError with the fix for values that cannot make a working adapter."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer (the adapter rank), got {r!r}. Typical values: 4 to 64.")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}. The paper uses lora_alpha = 2 * r.")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}. The paper uses 0.05.")
    if init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}.")
