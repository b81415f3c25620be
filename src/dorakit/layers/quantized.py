"""DoRA/LoRA over bitsandbytes' quantized linears (QDoRA): ``Linear4bit`` (NF4/FP4, with or without
double quantization) and ``Linear8bitLt``.

The base output comes from bitsandbytes' own quantized matmul; the adapter adds to it exactly as
over ``nn.Linear``. What differs is the weight itself: W0 here is the *dequantized* weight, the
one the quantized layer computes with, so

- the magnitude starts at ||deq(W0)||_row and the adapted model equals the quantized base at
  step 0 (fsdp_qlora initialises it from the unquantized weight: a different model at step 0);
- the norm's base products read deq(W0) through ``QuantizedRows``, a few rows at a time: the
  functional code asks for row chunks of bounded size, and only those rows are dequantized. No
  full-precision copy of the layer exists at any time (PEFT dequantizes the whole weight on every
  forward). As for every layer, the norm is computed once per optimizer step (cached), and
  ||deq(W0)||^2 once in total;
- merging cannot be written back into 4 or 8 bits exactly, so ``merge()`` refuses and
  ``merged_base()`` returns a full-precision ``nn.Linear`` holding m * (deq(W0) + sBA) / ||.||.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from .. import functional as F_dora
from .linear import Linear

INSTALL_HINT = "pip install 'dorakit[quant]' (bitsandbytes>=0.45)"


def _bnb_classes() -> tuple[type, ...]:
    """bitsandbytes' quantized linear classes, if bitsandbytes is imported (a model holding one has)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is None:
        return ()
    return tuple(getattr(bnb_nn, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(bnb_nn, name))


def is_quantized_linear(module: nn.Module) -> bool:
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes)


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"Quantized bases need bitsandbytes, which is not installed ({err}). Install it with: {INSTALL_HINT}.") from None
    return bitsandbytes


class QuantizedRows:
    """A quantized weight seen as [out, in] rows of floats, dequantized on demand.

    ``rows[i:j]`` (or ``rows.index_select(0, index)``) dequantizes only those rows; ``.shape``, ``.device``
    and ``.dtype`` describe the float matrix. This is all ``dorakit.functional`` reads from a base
    weight, so the factored norm and the merge run over quantized layers unchanged.
    """

    def __init__(self, layer: nn.Module) -> None:
        import bitsandbytes.functional as bnb_f

        self._f = bnb_f
        weight = layer.weight
        self.device = weight.device
        self.four_bit = getattr(weight, "quant_state", None) is not None
        if self.four_bit:
            state = weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                raise ValueError(
                    "This 4-bit layer was repacked by bitsandbytes for CPU inference (AVX512-BF16), which does not "
                    "keep its exact quantization state. Load the model again and add the adapter before running it "
                    "in eval mode (dorakit switches that repacking off for the layers it wraps)."
                )
            self.shape = torch.Size(state.shape)
            self.dtype = state.dtype
            self._state = state
            self._packed = weight.data.view(torch.uint8).reshape(-1)  # two 4-bit values per byte, row-major
            self._absmax: Tensor | None = None
        else:
            # Linear8bitLt: int8 rows (weight.data) with one fp32 scale per row; bitsandbytes moves the
            # scale to layer.state.SCB at the first forward.
            scb = getattr(weight, "SCB", None)
            if scb is None:
                scb = getattr(getattr(layer, "state", None), "SCB", None)
            if scb is None or weight.data.dtype != torch.int8:
                raise ValueError("This Linear8bitLt holds no int8 weight yet; move it to its device first (.to(device)).")
            self.shape = torch.Size(weight.data.shape)
            self.dtype = torch.float32
            self._int8, self._scb = weight.data, scb

    def _absmax_values(self) -> Tensor:
        """Per-block absmax as floats; with double quantization they are themselves 8-bit codes
        (a [blocks] vector, 1/blocksize of the weight: small)."""
        if self._absmax is None:
            state = self._state
            if state.nested:
                absmax = self._f.dequantize_blockwise(state.absmax, state.state2)
                self._absmax = (absmax + state.offset).float()
            else:
                self._absmax = state.absmax.float()
        return self._absmax

    def _rows(self, start: int, stop: int) -> Tensor:
        if not self.four_bit:
            return self._f.int8_vectorwise_dequant(self._int8[start:stop], self._scb[start:stop])
        state, width = self._state, self.shape[1]
        block = state.blocksize
        if width % block:
            # bitsandbytes' CPU kernel reads blocks per row, so it needs whole blocks per row; a layer
            # without (no real model's width) is read whole, as bitsandbytes itself reads it.
            return self._f.dequantize_4bit(self._packed.reshape(-1, 1), state)[start:stop]
        # Whole blocks per row: rows [start, stop) are packed bytes [start*in/2, stop*in/2) and
        # blocks [start*in/block, stop*in/block) of the row-major flattened weight.
        begin, end = start * width, stop * width
        sub_state = self._f.QuantState(absmax=self._absmax_values()[begin // block : end // block],
                                       shape=torch.Size([stop - start, width]), code=state.code, blocksize=block,
                                       quant_type=state.quant_type, dtype=state.dtype)
        packed = self._packed[begin // 2 : end // 2].reshape(-1, 1)  # [(rows * in) / 2, 1]
        return self._f.dequantize_4bit(packed, sub_state)  # [stop - start, in]

    def __getitem__(self, rows: slice | Tensor) -> Tensor:
        if isinstance(rows, Tensor):
            return self.index_select(0, rows)
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("QuantizedRows takes contiguous row ranges.")
        return self._rows(start, stop)

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        """The rows ``index`` ([k] on the weight's device) dequantized, [k, in]: the norm's exact
        recomputation of its most cancelled rows. Gathered by index arithmetic on the device, so no
        value is read back to the host (issue 18)."""
        if dim != 0:
            raise ValueError("QuantizedRows selects rows (dim 0) only.")
        index = index.reshape(-1)
        if not self.four_bit:
            return self._f.int8_vectorwise_dequant(self._int8.index_select(0, index), self._scb.index_select(0, index))
        state, width = self._state, self.shape[1]
        block = state.blocksize
        if width % block:  # as in _rows: bitsandbytes' CPU kernel needs whole blocks per row
            return self._f.dequantize_4bit(self._packed.reshape(-1, 1), state).index_select(0, index)
        packed = self._packed.reshape(self.shape[0], width // 2).index_select(0, index)  # [k, in / 2]
        absmax = self._absmax_values().reshape(self.shape[0], width // block).index_select(0, index)  # [k, in / block]
        sub_state = self._f.QuantState(absmax=absmax.reshape(-1), shape=torch.Size([index.shape[0], width]),
                                       code=state.code, blocksize=block, quant_type=state.quant_type, dtype=state.dtype)
        return self._f.dequantize_4bit(packed.reshape(-1, 1), sub_state)  # [k, in]

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole dequantized weight [out, in] (for merged export), filled chunk by chunk."""
        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device)
        for rows in F_dora.row_chunks(*self.shape):
            out[rows] = self[rows]
        return out


class _QuantizedMatmul(torch.autograd.Function):
    """x @ deq(W0)^T + b, and W0 @ A^T for the norm, from one pass over the 4-bit weight.

    bitsandbytes' training matmul dequantizes the whole weight for the forward and again for the
    backward; the DoRA norm would read it a third time. Here the forward dequantizes a bounded
    chunk of rows at a time (``functional.row_chunks``) and uses each chunk twice: for the output
    columns of those rows and for those rows of W0 @ A^T. The backward reads the weight once more
    (grad_x = grad_y @ deq(W0)), as bitsandbytes' does. No full-precision copy of the layer exists.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, lora_A: Tensor, rows: QuantizedRows):
        out_features, in_features = rows.shape
        y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
        weight_a = torch.empty(out_features, lora_A.shape[0], dtype=torch.float32, device=x.device)
        a = lora_A.detach().float()
        for chunk in F_dora.row_chunks(out_features, in_features):
            w = rows[chunk]  # [rows, in]
            y[..., chunk] = x @ w.to(x.dtype).T
            with torch.autocast(device_type=x.device.type, enabled=False):  # the norm's term stays fp32
                weight_a[chunk] = w.float() @ a.T  # [rows, r]
        if bias is not None:
            y += bias.to(y.dtype)
        ctx.rows = rows
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(weight_a)
        return y, weight_a

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_weight_a: Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            rows = ctx.rows
            grad_x = torch.zeros(*grad_y.shape[:-1], rows.shape[1], dtype=grad_y.dtype, device=grad_y.device)
            for chunk in F_dora.row_chunks(*rows.shape):
                grad_x += grad_y[..., chunk] @ rows[chunk].to(grad_y.dtype)  # [..., in]
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a bitsandbytes layer computes in (4-bit: its compute dtype; 8-bit: fp32)."""
    dtype = getattr(module, "compute_dtype", None)
    if dtype is None:
        state = getattr(module.weight, "quant_state", None)
        dtype = state.dtype if state is not None else torch.float32
    return dtype


@torch.no_grad()
def dequantize_module(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A full-precision ``nn.Linear`` with a bitsandbytes layer's dequantized weight and its bias
    (filled row chunk by row chunk)."""
    dtype = dtype or compute_dtype(module)
    rows = QuantizedRows(module)
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=rows.device, dtype=dtype)
    plain.weight.copy_(rows.to_dense(dtype))
    if module.bias is not None:
        plain.bias.copy_(module.bias)
    return plain


class QuantizedLinear(Linear):
    """DoRA (``use_dora=True``) or LoRA over a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``."""

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            # bitsandbytes repacks a 4-bit weight in place at the first CPU eval forward; the repacked
            # layout cannot be dequantized exactly, so the norm could no longer be computed.
            base_layer.support_avx512bf16_for_cpu = False
        kwargs.pop("fan_in_fan_out", None)
        super().__init__(base_layer, fan_in_fan_out=False, **kwargs)

    def base_rows(self, weight: Tensor) -> QuantizedRows:
        return QuantizedRows(self.base_layer)

    @property
    def four_bit(self) -> bool:
        return getattr(self.base_layer.weight, "quant_state", None) is not None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        fused = (self.use_dora and self.four_bit and torch.is_grad_enabled() and not (self.disabled or self.merged)
                 and isinstance(self.lora_dropout, nn.Identity) and not args and not kwargs)
        if not fused:
            return super().forward(x, *args, **kwargs)
        # Training step (no dropout): the base output and W0 @ A^T from one pass over the weight, the
        # norm from them and the cached ||W0||^2, then the usual composition.
        rows = QuantizedRows(self.base_layer)
        dtype = getattr(self.base_layer, "compute_dtype", None) or x.dtype
        result, weight_a = _QuantizedMatmul.apply(x.to(dtype), self.bias, self.lora_A.weight, rows)
        norm = F_dora.dora_row_norm(rows, self.lora_A_rows(), self.lora_B_rows(), self.scaling,
                                    base_sq=self.base_sq_norms(), weight_a=weight_a)
        return self.adapted_output(x, result.to(x.dtype), self.dora_scale(norm))

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    def base_forward_without_bias(self, x: Tensor) -> Tensor:
        # The dropout path needs x' W0^T: bitsandbytes' matmul, minus the bias it adds (as PEFT does).
        out = self.base_layer(x)
        bias = self.bias
        return out if bias is None else out - bias.to(out.dtype)

    def merge(self) -> None:
        raise RuntimeError(
            "A quantized base cannot hold the merged adapter exactly. Use dorakit.merge_and_unload(model), which "
            "replaces each quantized layer by a full-precision nn.Linear with the adapter folded in, or "
            "`dorakit merge --quantize ...` to write a full-precision merged checkpoint."
        )

    @torch.no_grad()
    def merged_base(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A full-precision ``nn.Linear`` computing what this layer computes: deq(W0) with the
        adapter folded in (merged in fp32, then ``dtype``, default the layer's compute dtype)."""
        plain = dequantize_module(self.base_layer, torch.float32)
        F_dora.merge_rows_(plain.weight.data, self.lora_A_rows(), self.lora_B_rows(), self.scaling,
                           self.lora_magnitude_vector)
        return plain.to(dtype or compute_dtype(self.base_layer))

    def extra_repr(self) -> str:
        bits = "4-bit" if self.four_bit else "8-bit"
        return f"{super().extra_repr()}, base={bits}"
