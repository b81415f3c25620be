"""Golden numbers and properties of the DoRA math (dorakit.functional)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dorakit import functional as F

from .conftest import rel_err

W0 = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # row 1 is a zero row, as in real checkpoints
A = torch.tensor([[1.0, 0.0]])  # [r=1, in=2]
B = torch.tensor([[1.0], [0.0]])  # [out=2, r=1]


def test_golden_factored_norm():
    # W0 + 1 * B @ A = [[4, 4], [0, 0]]: row norms sqrt(32) and 0 (clamped, never NaN).
    norm = F.dora_row_norm(W0, A, B, 1.0)
    assert norm[0].item() == pytest.approx(math.sqrt(32), rel=1e-7)
    assert norm[1].item() == pytest.approx(F.NORM_EPS, rel=1e-6)
    terms = F.row_terms(W0, A, B)
    assert terms.base_sq.tolist() == [25.0, 0.0]
    assert terms.cross.tolist() == [3.0, 0.0]  # B_0 . (W0 @ A^T)_0 = 1 * 3
    assert terms.quad.tolist() == [1.0, 0.0]  # ||(B @ A)_0||^2


def test_golden_scaling_enters_squared():
    # s = 2: [[5, 4], [0, 0]] -> sqrt(41)
    assert F.dora_row_norm(W0, A, B, 2.0)[0].item() == pytest.approx(math.sqrt(41), rel=1e-7)


def compose_reference(x, w0, a, b, m, s, bias=None):
    """The paper's formula, term by term."""
    g = m / F.dora_row_norm(w0, a, b, s)
    y = g * (x @ w0.T + s * (x @ a.T) @ b.T)
    return y if bias is None else y + bias


def compose_fused(x, w0, a, b, m, s, bias=None, dropped=None):
    """What the layers do: B pre-scaled by g*s, the bias correction in the LoRA matmul, one addcmul."""
    g = m / F.dora_row_norm(w0, a, b, s)
    base_out = x @ w0.T + (0 if bias is None else bias)
    xa = (x if dropped is None else dropped) @ a.T
    lora = torch.nn.functional.linear(xa, F.scaled_lora_B(b, g, s), None if dropped is not None else F.bias_correction(bias, g))
    return F.dora_compose(base_out, lora, g, base_dropped=None if dropped is None else dropped @ w0.T)


def test_golden_compose_equals_merged_weight():
    m = torch.tensor([5.0, 0.0])
    x = torch.tensor([[1.0, 1.0]])
    y = compose_fused(x, W0, A, B, m, 1.0)
    # by hand: row 0 = 5 / sqrt(32) * (7 + 1); row 1 = 0 (zero row, zero magnitude: no NaN)
    assert y.tolist()[0] == pytest.approx([5 / math.sqrt(32) * 8, 0.0], rel=1e-6)
    merged = W0.clone()
    F.merge_rows_(merged, A, B, 1.0, m)
    assert merged.tolist()[0] == pytest.approx([5 / math.sqrt(32) * 4] * 2, rel=1e-6)
    assert merged[1].tolist() == [0.0, 0.0]
    assert (x @ merged.T).tolist()[0] == pytest.approx(y.tolist()[0], rel=1e-6)


def test_golden_bias_is_not_scaled():
    # W0 = I, B = 0: y = g * x + b, with the bias untouched by g.
    w0, a, b = torch.eye(2), torch.ones(1, 2), torch.zeros(2, 1)
    m = torch.tensor([2.0, 3.0])  # row norms are 1, so g = m
    bias = torch.tensor([10.0, 20.0])
    y = compose_fused(torch.tensor([[1.0, 1.0]]), w0, a, b, m, 1.0, bias)
    assert y.tolist() == [[12.0, 23.0]]


def test_fused_compose_equals_the_formula():
    torch.manual_seed(0)
    x, w0, a, b = torch.randn(5, 7), torch.randn(4, 7), torch.randn(3, 7), torch.randn(4, 3) * 0.2
    m, bias = torch.rand(4) + 0.5, torch.randn(4)
    expected = compose_reference(x, w0, a, b, m, 0.7, bias)
    assert rel_err(compose_fused(x, w0, a, b, m, 0.7, bias), expected) < 1e-6
    # The dropout form with x' = x is the same function.
    assert rel_err(compose_fused(x, w0, a, b, m, 0.7, bias, dropped=x), expected) < 1e-6


def test_merge_then_unmerge_is_exact_without_cache():
    torch.manual_seed(0)
    w0 = torch.randn(64, 48)
    a, b = torch.randn(8, 48) * 0.1, torch.randn(64, 8) * 0.1
    m = F.dora_row_norm(w0, a, b, 2.0) * (1 + 0.3 * torch.randn(64))
    w = w0.clone()
    terms = F.merge_rows_(w, a, b, 2.0, m)
    assert rel_err(w, w0) > 1e-2  # the merge changed something
    # Only the merged weight, the adapter and ||W0_i||^2 go in: nothing cached from the merge.
    norm = F.norm_from_terms(terms, 2.0)
    for kwargs in (dict(merge_norm=norm), dict(base_sq=terms.base_sq), dict(merge_norm=norm, base_sq=terms.base_sq)):
        again = w.clone()
        F.unmerge_rows_(again, a, b, 2.0, m, **kwargs)
        assert rel_err(again, w0) < 1e-6


def test_unmerge_with_a_different_adapter_is_refused():
    torch.manual_seed(5)
    w0, a, b = torch.randn(8, 6), torch.randn(2, 6), torch.randn(8, 2) * 0.3
    m = F.dora_row_norm(w0, a, b, 1.0)
    w = w0.clone()
    terms = F.merge_rows_(w, a, b, 1.0, m)
    before = w.clone()
    with pytest.raises(ValueError, match="does not match"):
        F.unmerge_rows_(w, a, b * 1.5, 1.0, m, merge_norm=F.norm_from_terms(terms, 1.0), base_sq=terms.base_sq)
    assert torch.equal(w, before)


def test_unmerge_handles_zero_rows_and_negative_magnitude():
    torch.manual_seed(1)
    w0 = torch.randn(6, 5)
    w0[2] = 0
    a, b = torch.randn(2, 5), torch.randn(6, 2) * 0.05
    m = F.dora_row_norm(w0, a, b, 1.0)
    m[4] = -m[4]  # training can flip a magnitude's sign
    w = w0.clone()
    terms = F.merge_rows_(w, a, b, 1.0, m)
    F.unmerge_rows_(w, a, b, 1.0, m, base_sq=terms.base_sq)
    assert torch.isfinite(w).all()
    assert rel_err(w, w0) < 1e-6
    assert w[2].abs().max().item() == 0.0


def test_unmerge_refuses_zero_magnitude_rows():
    w0 = torch.randn(3, 4)
    a, b = torch.randn(1, 4), torch.zeros(3, 1)
    m = torch.tensor([1.0, 0.0, 1.0])
    w = w0.clone()
    terms = F.merge_rows_(w, a, b, 1.0, m)
    before = w.clone()
    with pytest.raises(ValueError, match="magnitude 0"):
        F.unmerge_rows_(w, a, b, 1.0, m, merge_norm=F.norm_from_terms(terms, 1.0), base_sq=terms.base_sq)
    assert torch.equal(w, before)  # nothing changed


def test_rotation_check_flags_rows_turned_past_90_degrees():
    w0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[-3.0], [0.0]])  # row 0 becomes [-2, 0]: turned by 180 degrees
    ok = F.rotation_ok(F.row_terms(w0, a, b), 1.0)
    assert ok.tolist() == [False, True]


def test_lora_merge_unmerge_roundtrip():
    torch.manual_seed(2)
    w0 = torch.randn(16, 12)
    a, b = torch.randn(4, 12), torch.randn(16, 4)
    w = w0.clone()
    F.merge_rows_(w, a, b, 0.5)
    assert rel_err(w, w0 + 0.5 * b @ a) < 1e-6
    F.unmerge_rows_(w, a, b, 0.5)
    assert rel_err(w, w0) < 1e-6


class _LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor an op allocates (views of existing tensors are not
    temporaries: a whole-weight slice costs nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        storages = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_norm_and_merge_never_build_an_out_by_in_temporary(base_dtype):
    out_f, in_f, r = 96, 320, 8
    w0 = torch.randn(out_f, in_f).to(base_dtype)
    a, b = torch.randn(r, in_f), torch.randn(out_f, r)
    bound = 4 * in_f  # four rows per chunk
    with _LargestTensor() as probe:
        F.dora_row_norm(w0, a, b, 2.0, chunk_elements=bound)
    assert probe.largest <= max(bound, out_f * r, r * in_f) < out_f * in_f
    with _LargestTensor() as probe:
        F.merge_rows_(w0, a, b, 2.0, torch.ones(out_f), chunk_elements=bound)
    assert probe.largest <= max(bound, out_f * r, r * in_f) < out_f * in_f


def test_chunked_equals_unchunked():
    torch.manual_seed(3)
    w0, a, b = torch.randn(37, 29), torch.randn(5, 29), torch.randn(37, 5)
    whole = F.dora_row_norm(w0, a, b, 1.5)
    for chunk in (1, 29, 30, 100, 10_000):
        assert rel_err(F.dora_row_norm(w0, a, b, 1.5, chunk_elements=chunk), whole) < 1e-7


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@settings(max_examples=60, deadline=None)
@given(
    out_f=st.integers(1, 48),
    in_f=st.integers(1, 48),
    r=st.integers(1, 9),
    scaling=st.floats(0.01, 8.0),
    dtype=st.sampled_from(DTYPES),
    chunk=st.integers(1, 3000),
    seed=st.integers(0, 2**16),
)
# Cancellation inside the cross and quad dot products, which the old measure (|cross|, quad) missed: 2.6e-5.
@example(out_f=1, in_f=1, r=8, scaling=2.0, dtype=torch.float32, chunk=1, seed=256)
def test_factored_norm_equals_direct_norm(out_f, in_f, r, scaling, dtype, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_f, in_f, generator=gen).to(dtype)
    a = (torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)).to(dtype)
    b = (torch.randn(out_f, r, generator=gen) * 0.3).to(dtype)
    factored = F.dora_row_norm(w0, a, b, scaling, chunk_elements=chunk)
    exact = torch.linalg.vector_norm(w0.double() + scaling * (b.double() @ a.double()), dim=1)
    assert factored.dtype == torch.float32
    # Both sides see the same (rounded) inputs; the factored form accumulates in fp32.
    assert rel_err(factored, exact) < 1e-5


def test_unmerge_is_exact_for_rows_turned_past_90_degrees():
    w0 = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[-3.0], [0.2]])  # row 0 flips direction
    m = torch.tensor([0.7, 1.3])
    w = w0.clone()
    terms = F.merge_rows_(w, a, b, 1.0, m)
    turned = ~F.rotation_ok(terms, 1.0)
    assert turned.tolist() == [True, False]
    wrong = w.clone()
    F.unmerge_rows_(wrong, a, b, 1.0, m, base_sq=terms.base_sq)  # without the flag: the other root
    assert rel_err(wrong, w0) > 0.1
    F.unmerge_rows_(w, a, b, 1.0, m, base_sq=terms.base_sq, turned=turned)
    assert rel_err(w, w0) < 1e-6


def test_cancelled_rows_are_recomputed_exactly():
    # The update almost negates row 0: the factored terms are ~1 while the norm is ~1e-3.
    w0 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[-0.999], [0.1]])
    norm = F.dora_row_norm(w0, a, b, 1.0)
    exact = torch.linalg.vector_norm(w0.double() + b.double() @ a.double(), dim=1)
    assert rel_err(norm, exact) < 1e-6
    assert norm[0].item() == pytest.approx(1e-3, rel=1e-4)


def test_cancellation_inside_the_dot_products_is_measured():
    """The falsifying example above: its row cancels inside B_i . (W0 A^T)_i and B_i (A A^T) B_i^T, so
    the terms' sum looks harmless (0.32) while fp32 rounding is 2.6e-5 of the norm. The bound
    (||W0_i|| + |s| sum_k |B_ik| ||A_k||)^2 sees it."""
    gen = torch.Generator().manual_seed(256)
    w0 = torch.randn(1, 1, generator=gen)
    a, b = torch.randn(8, 1, generator=gen), torch.randn(1, 8, generator=gen) * 0.3
    ratio = F.cancellation_ratio(F.row_terms(w0, a, b), a, b, 2.0)
    assert ratio.item() < F.CANCELLATION
    assert F.cancellation_ratio(F.row_terms(W0, A, B), A, B, 1.0).tolist() == [pytest.approx(32 / 36), 1.0]  # (5 + 1)^2


def test_the_most_cancelled_rows_are_exact_among_many():
    """More rows than EXACT_ROWS, a few of them cancelled to 1e-4 of their size: those rows come out
    exact (fp64), wherever they sit, while the benign ones keep the factored value."""
    torch.manual_seed(0)
    out_f, in_f = 3 * F.EXACT_ROWS, 64
    w0, a = torch.randn(out_f, in_f), torch.randn(4, in_f) / 8
    b = torch.randn(out_f, 4) * 0.1
    cancelled = [0, 17, out_f - 1]
    for i in cancelled:  # choose B_i so that W0_i + B_i A is 1e-4 of W0_i along A's span
        b[i] = -torch.linalg.lstsq(a.T, w0[i]).solution
        w0[i] = -(b[i] @ a) + 1e-4 * torch.randn(in_f)
    norm = F.dora_row_norm(w0, a, b, 1.0)
    exact = torch.linalg.vector_norm(w0.double() + b.double() @ a.double(), dim=1)
    assert ((norm.double() - exact).abs() / exact).max() < 1e-6
    ratio = F.cancellation_ratio(F.row_terms(w0, a, b), a, b, 1.0)
    assert (ratio[cancelled] < F.CANCELLATION).all()


def test_norm_reads_nothing_back_to_the_host():
    """Fixed shapes (a top-k of the cancellation ratio), no `.item()`, `nonzero` or mask indexing: on a
    GPU the norm never waits for the device (issue 18; tests/test_host_syncs.py checks whole models)."""
    from .test_host_syncs import SyncProbe

    w0, a, b = torch.randn(40, 24), torch.randn(4, 24), torch.randn(40, 4)
    with SyncProbe() as probe:
        F.dora_row_norm(w0, a, b, 2.0, chunk_elements=48)
    assert not probe.counts


def test_compose_saves_a_half_precision_base_output_as_it_is():
    """With fp32 adapters over a bf16 base, the base output is saved for backward in bf16 (the tensor
    itself), never as an fp32 copy: that copy was [tokens, out] x 4 bytes of activation memory per layer."""
    base = torch.randn(6, 5).bfloat16()
    lora, scale = torch.randn(6, 5, requires_grad=True), torch.ones(5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = F.dora_compose(base, lora, scale)
    assert out.dtype == torch.float32
    assert [(t.dtype, t.data_ptr() == base.data_ptr()) for t in saved if t.shape == base.shape] == [(torch.bfloat16, True)]


def test_merge_with_a_given_norm_divides_by_it_and_unmerges_exactly():
    # Several DoRA adapters merged in turn on one PEFT layer: each m is divided by the norm over the
    # unmerged base, not over the weight it is merged into.
    w = torch.tensor([[3.0, 4.0], [1.0, 2.0]], dtype=torch.float64)
    m = torch.tensor([2.0, 3.0], dtype=torch.float64)
    given = torch.tensor([4.0, 5.0], dtype=torch.float64)
    merged = w.clone()
    F.merge_rows_(merged, A.double(), B.double(), 1.0, m, norm=given)
    expected = (m / given)[:, None] * (w + B.double() @ A.double())
    assert torch.equal(merged, expected)
    F.unmerge_rows_(merged, A.double(), B.double(), 1.0, m, merge_norm=given)
    assert rel_err(merged, w) < 1e-15
