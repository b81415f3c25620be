"""DoRA's input-axis magnitude (magnitude_axis="in", issue 16) against a direct fp64 computation.

The reference builds W' = (W0 + s B A) diag(m / ||W0 + s B A||_col) as LyCORIS defines it (a conv's
column: one input channel over every output channel and kernel position) and runs the base op with it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dorakit
from dorakit import functional as F_dora
from dorakit.layers import InputAxisConv, InputAxisLinear

from .conftest import rel_err, tiny_gpt2


def direct_weight(layer, detach_norm: bool = True) -> torch.Tensor:
    """W' of an input-axis layer, computed from its parameters in the weight's own layout."""
    w0 = layer.base_layer.weight
    transposed = getattr(layer, "fan_in_fan_out", False)
    w0 = w0.T if transposed else w0  # [out, in, *k]
    out, r = w0.shape[0], layer.r
    a, b = layer.lora_A.weight, layer.lora_B.weight
    v = w0 + layer.scaling * (b.reshape(out, r) @ a.reshape(r, -1)).reshape(w0.shape)
    norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)  # LyCORIS's column norm
    if detach_norm:
        norm = norm.detach()
    g = layer.lora_magnitude_vector.reshape(-1) / norm
    merged = v * g.reshape((1, -1) + (1,) * (v.dim() - 2))
    return merged.T if transposed else merged


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
        self.conv1x1 = nn.Conv2d(5, 6, 1, bias=False)
        self.fc = nn.Linear(6 * 4, 7)

    def forward(self, x):
        h = self.conv1x1(self.conv(x).relu())  # [N, 6, 2, 2]
        return self.fc(h.flatten(1))


def direct_net(net: Net, x: torch.Tensor) -> torch.Tensor:
    h = F.conv2d(x, direct_weight(net.conv), net.conv.base_layer.bias, stride=2, padding=1).relu()
    h = F.conv2d(h, direct_weight(net.conv1x1))
    return F.linear(h.flatten(1), direct_weight(net.fc), net.fc.base_layer.bias)


def adapted_net(dtype=torch.float64, **overrides) -> Net:
    torch.manual_seed(0)
    net = Net().to(dtype)
    cfg = dict(r=2, lora_alpha=6, target_modules=["conv", "conv1x1", "fc"], magnitude_axis="in", init_lora_weights=False)
    cfg.update(overrides)
    dorakit.inject_adapters(net, dorakit.DoraConfig(**cfg))
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "magnitude" in name:
                param.mul_(1 + 0.3 * torch.randn_like(param))
    return net


def image(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_layers_and_shapes_follow_lycoris():
    net = adapted_net()
    assert isinstance(net.conv, InputAxisConv) and isinstance(net.fc, InputAxisLinear)
    assert net.conv.lora_magnitude_vector.shape == (1, 3, 1, 1)  # dora_scale [1, in, 1, 1]
    assert net.fc.lora_magnitude_vector.shape == (1, 24)  # dora_scale [1, in]


def test_identity_at_init():
    torch.manual_seed(0)
    net = Net().double()
    x = image()
    base = net(x)
    dorakit.inject_adapters(net, dorakit.DoraConfig(r=2, lora_alpha=4, target_modules=["conv", "fc"], magnitude_axis="in"))
    assert rel_err(net(x), base) < 1e-12


def test_forward_and_merge_match_the_direct_computation():
    net = adapted_net()
    x = image()
    reference = direct_net(net, x)
    assert rel_err(net(x), reference) < 1e-6  # the norm is accumulated in fp32, as for the output axis
    for layer in (net.conv, net.conv1x1, net.fc):
        expected = direct_weight(layer).detach().clone()
        layer.merge()
        assert rel_err(layer.base_layer.weight, expected) < 1e-13  # fp64 merge
    assert rel_err(net(x), reference) < 1e-13


def test_unmerge_restores_the_base_exactly():
    net = adapted_net(dtype=torch.float32)
    originals = {name: layer.base_layer.weight.detach().clone() for name, layer in
                 (("conv", net.conv), ("conv1x1", net.conv1x1), ("fc", net.fc))}
    for layer in (net.conv, net.conv1x1, net.fc):
        layer.merge()
        layer.merge()  # idempotent
        layer.unmerge()
    for name, layer in (("conv", net.conv), ("conv1x1", net.conv1x1), ("fc", net.fc)):
        assert (layer.base_layer.weight - originals[name]).abs().max() <= 4 * torch.finfo(torch.float32).eps


def test_unmerge_after_a_reload_from_the_saved_norms():
    net = adapted_net(dtype=torch.float32)
    original = net.fc.base_layer.weight.detach().clone()
    net.fc.merge()
    norms = net.fc.merged_row_norms()
    assert norms["row_norm"].shape == (24,)
    net.fc.merged, net.fc._merged_norms = False, {}  # as if another process loaded the merged weight
    net.fc.set_merged(**norms)
    net.fc.unmerge()
    assert rel_err(net.fc.base_layer.weight, original) < 1e-6


def test_gradients_match_the_direct_computation_with_a_detached_norm():
    net = adapted_net()
    x = image()
    net(x).square().sum().backward()
    ours = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad()
    direct_net(net, x).square().sum().backward()  # paper section 4.3: the norm is a constant in backward
    for name, grad in ours.items():
        assert rel_err(grad, net.get_parameter(name).grad) < 1e-5, name
    assert any("magnitude" in n for n in ours) and any("lora_A" in n for n in ours)


def test_dropout_applies_the_whole_change_to_the_dropped_input():
    torch.manual_seed(0)
    fc = nn.Linear(6, 4).double()
    model = nn.Sequential(fc)
    dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, lora_alpha=4, target_modules=["0"], magnitude_axis="in",
                                                      lora_dropout=0.5, init_lora_weights=False))
    layer = model[0]
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.manual_seed(7)
    y = model.train()(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    w_prime = direct_weight(layer)
    reference = F.linear(x, fc.weight, fc.bias) + F.linear(dropped, w_prime - fc.weight)
    assert rel_err(y, reference) < 1e-6


def test_conv1d_of_transformers_takes_the_input_axis():
    torch.manual_seed(0)
    model = tiny_gpt2().double()
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], magnitude_axis="in",
                                                      init_lora_weights=False))
    layer = model.transformer.h[0].mlp.c_fc
    assert layer.lora_magnitude_vector.shape == (1, 32)  # Conv1D [in=32, out=128]: one per input feature
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    expected = x @ direct_weight(layer) + layer.base_layer.bias
    assert rel_err(layer(x), expected) < 1e-6
    before = model(ids).logits
    layer.merge()
    assert rel_err(model(ids).logits, before) < 1e-6  # the unmerged norm is fp32


def test_factored_column_norm_of_a_conv_equals_the_direct_norm():
    torch.manual_seed(0)
    w0 = torch.randn(6, 4, 3, 3)
    a, b = torch.randn(2, 4 * 9), torch.randn(6, 2)
    direct = (w0.double() + 0.7 * (b.double() @ a.double()).reshape(w0.shape)).transpose(0, 1).reshape(4, -1).norm(dim=1)
    rows = w0.reshape(6, -1).T  # [in * k, out], a view
    ours = F_dora.dora_row_norm(rows, b.T, a.T, 0.7, group=9)
    assert rel_err(ours, direct) < 1e-6
    # A channel whose update cancels its base is recomputed exactly (no fp32 cancellation error).
    w0[:, 1] = -0.7 * (b @ a).reshape(w0.shape)[:, 1] + 1e-4 * torch.randn(6, 3, 3)
    direct = (w0.double() + 0.7 * (b.double() @ a.double()).reshape(w0.shape)).transpose(0, 1).reshape(4, -1).norm(dim=1)
    ours = F_dora.dora_row_norm(w0.reshape(6, -1).T, b.T, a.T, 0.7, group=9)
    assert rel_err(ours[1], direct[1]) < 1e-6


def test_zero_columns_stay_zero_without_nan():
    fc = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        fc.weight[:, 2] = 0
    model = nn.Sequential(fc)
    dorakit.inject_adapters(model, dorakit.DoraConfig(r=1, lora_alpha=1, target_modules=["0"], magnitude_axis="in"))
    y = model(torch.randn(2, 4))
    assert torch.isfinite(y).all()


def test_norm_cache_follows_the_adapter():
    net = adapted_net(dtype=torch.float32)
    x = image(torch.float32)
    net.eval()(x)
    with torch.no_grad():
        net.fc.lora_A.weight.mul_(2)
    assert rel_err(net(x), direct_net(net, x)) < 1e-5


@pytest.mark.parametrize("bad, message", [
    (dict(use_dora=False), "use_dora=True"),
    (dict(direction="vera", lora_alpha=8, r=2), "direction='lora'"),
    (dict(magnitude_axis="rows"), "magnitude_axis must be one of"),
])
def test_config_refuses_what_the_input_axis_cannot_be(bad, message):
    args = dict(r=2, lora_alpha=4, target_modules=["fc"], magnitude_axis="in")
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        dorakit.DoraConfig(**args)


def test_unsupported_layers_are_refused_with_the_fix():
    emb = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="Linear, Conv1D and Conv1d/2d/3d"):
        dorakit.inject_adapters(emb, dorakit.DoraConfig(r=2, lora_alpha=4, target_modules=["0"], magnitude_axis="in"))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1"):
        dorakit.inject_adapters(grouped, dorakit.DoraConfig(r=2, lora_alpha=4, target_modules=["0"], magnitude_axis="in"))
    assert isinstance(grouped[0], nn.Conv2d)  # unchanged


def test_training_steps_move_the_magnitude_and_keep_merge_exact():
    net = adapted_net(dtype=torch.float32)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x = image(torch.float32)
    before = net.fc.lora_magnitude_vector.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    assert not torch.equal(before, net.fc.lora_magnitude_vector)
    live = net(x)
    merged = dorakit.merge_and_unload(net)
    assert rel_err(merged(x), live) < 1e-5


def test_peft_format_refuses_the_input_axis(tmp_path):
    net = adapted_net(dtype=torch.float32)
    with pytest.raises(ValueError, match="save_kohya"):
        dorakit.save_adapter(net, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_decomposition_analysis_per_input_column():
    from dorakit.analysis.decomposition import decomposition_change

    net = adapted_net()
    for layer in (net.fc, net.conv):
        w0 = layer.base_layer.weight.detach().clone()
        magnitude = layer.lora_magnitude_vector.detach().reshape(-1)
        layer.merge()
        delta_m, delta_d = decomposition_change(w0, layer.base_layer.weight.detach(), axis="in")
        # A merged input-axis weight's column norms are its magnitudes: delta_m is their mean move from ||W0_col||.
        base_norms = w0.transpose(0, 1).reshape(w0.shape[1], -1).norm(dim=1)
        assert delta_m == pytest.approx((magnitude - base_norms).abs().mean().item(), rel=1e-9)
        assert delta_d > 0
