"""VeRA and DVoRA: parity with PEFT's VeRA (outputs, gradients, files), DVoRA's identity at init and
exact merge/unmerge, save/load round trips, and the errors for what VeRA cannot adapt.

Adapters start away from identity (random lambda_b and lambda_d, perturbed magnitudes) so that a wrong
slice of the shared projections, a missing vector or a wrong norm makes the tests fail.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import dorakit
from dorakit.formats.peft import load_adapter_tensors, read_adapter_tensors
from dorakit.layers import VeraLinear, VeraProjection

from .conftest import LinearNet, output_of, rel_err, seeded, tiny_gpt2, tiny_llama
from .test_functional import _LargestTensor
from .test_parity_peft import check_parity

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")

TOKENS = lambda: torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))  # noqa: E731
CASES = {
    # name -> (builder, input maker, targets); layers of different widths share one projection
    "linear": (LinearNet, lambda: torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(1)), ["fc1", "fc2"]),
    "llama": (tiny_llama, TOKENS, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2_conv1d": (tiny_gpt2, TOKENS, ["c_attn", "c_proj", "c_fc"]),
}


def perturb_vectors(model: nn.Module, seed: int = 5) -> None:
    """Random lambda_b / lambda_d (and magnitudes off their norms): a non-identity, non-uniform adapter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # lambda_b small enough that the update is the size of a pretrained-like base, not 100x it
            # (exact-unmerge tests measure rounding relative to the base weight).
            if "vera_lambda_b" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
            elif "vera_lambda_d" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen))


def vera_pair(builder, targets, *, dtype=torch.float32, **extra):
    """PEFT's VeRA and dorakit's at the same base weights, PEFT's adapter copied into ours through
    dorakit's own file-key loader (so this also checks the key mapping)."""
    base = seeded(builder).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out correction for Conv1D
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=4, target_modules=targets, **extra))
        ours = dorakit.inject_adapters(
            copy.deepcopy(base), dorakit.DoraConfig(r=4, target_modules=targets, direction="vera", use_dora=False, **_ours(extra))
        )
    perturb_vectors(theirs)
    load_adapter_tensors(ours, peft.get_peft_model_state_dict(theirs))
    return theirs.base_model.model, ours


def _ours(extra: dict) -> dict:
    names = {"vera_dropout": "lora_dropout", "init_weights": "init_lora_weights"}
    return {names.get(k, k): v for k, v in extra.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_projection_is_peft_bit_for_bit(case):
    builder, _, targets = CASES[case]
    theirs, ours = vera_pair(builder, targets, projection_prng_key=11)
    # Regenerated (not loaded): a fresh injection with the same seed draws the same bits as PEFT.
    fresh = dorakit.inject_adapters(seeded(builder), dorakit.DoraConfig(r=4, target_modules=targets, direction="vera",
                                                                        projection_prng_key=11))
    projection = next(m for m in fresh.modules() if isinstance(m, VeraProjection))
    peft_layer = next(m for m in theirs.modules() if isinstance(getattr(m, "vera_A", None), nn.Module))
    assert torch.equal(projection.vera_A, peft_layer.vera_A["default"])
    assert torch.equal(projection.vera_B, peft_layer.vera_B["default"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_vera_parity_outputs_and_gradients(case):
    # fp64: dorakit folds lambda_b into B before the matmul where PEFT scales the output after it, so
    # fp32 results differ by rounding (~1e-5 after two layers); in fp64 the two must agree to 1e-10.
    builder, make_input, targets = CASES[case]
    theirs, ours = vera_pair(builder, targets, dtype=torch.float64)
    inputs = make_input()
    check_parity(theirs, ours, inputs.double() if inputs.is_floating_point() else inputs, tol=1e-10)


def test_vera_parity_with_dropout_in_training():
    builder, make_input, targets = CASES["linear"]
    theirs, ours = vera_pair(builder, targets, vera_dropout=0.3)
    theirs.train()
    ours.train()
    check_parity(theirs, ours, make_input(), seed=11)


def test_vera_parity_merged():
    builder, make_input, targets = CASES["llama"]
    theirs, ours = vera_pair(builder, targets)
    with torch.no_grad():
        expected = output_of(theirs, make_input())
        merged = dorakit.merge_and_unload(ours)
        assert not any(isinstance(m, VeraLinear) for m in merged.modules())
        assert rel_err(output_of(merged, make_input()), expected) < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_dvora_starts_as_the_base_model(case):
    builder, make_input, targets = CASES[case]
    base = seeded(builder)
    expected = output_of(base, make_input())
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=4, target_modules=targets, direction="vera"))
    assert torch.allclose(output_of(model, make_input()), expected, atol=1e-6, rtol=1e-5)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d", "lora_magnitude_vector"}


def dvora(case: str, seed: int = 5):
    builder, make_input, targets = CASES[case]
    base = seeded(builder)
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=4, target_modules=targets, direction="vera"))
    perturb_vectors(model, seed)
    return base, model, make_input


@pytest.mark.parametrize("case", sorted(CASES))
def test_dvora_merge_unmerge_exact(case):
    base, model, make_input = dvora(case)
    with torch.no_grad():
        unmerged = output_of(model, make_input())
        assert rel_err(unmerged, output_of(base, make_input())) > 1e-3  # the adapter does something
        for _, layer in dorakit.adapter_layers(model):
            layer.merge()
        assert rel_err(output_of(model, make_input()), unmerged) < 1e-5
        restored = dorakit.unload(model)
    for (name, p), q in zip(restored.named_parameters(), base.parameters()):
        assert rel_err(p, q) < 1e-6, name


def test_dvora_merged_forward_matches_its_formula():
    # W' = m * (W0 + diag(lb) B diag(ld) A) / ||.||_row, written out for one layer.
    _, model, _ = dvora("linear")
    layer = model.fc1
    w0 = layer.base_layer.weight.detach().double()
    a = layer.vera_projection.vera_A[:, :10].double() * layer.vera_lambda_d.detach().double()[:, None]
    b = layer.vera_projection.vera_B[:24].double() * layer.vera_lambda_b.detach().double()[:, None]
    w = w0 + b @ a
    expected = layer.lora_magnitude_vector.detach().double()[:, None] * w / w.norm(dim=1, keepdim=True)
    layer.merge()
    assert rel_err(layer.base_layer.weight, expected) < 1e-6


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("use_dora", [True, False], ids=["dvora", "vera"])
def test_save_load_round_trip(tmp_path, use_dora, save_projection):
    builder, make_input, targets = CASES["llama"]
    base = seeded(builder)
    cfg = dorakit.DoraConfig(r=4, target_modules=targets, direction="vera", use_dora=use_dora,
                             save_projection=save_projection, projection_prng_key=3)
    model = dorakit.inject_adapters(copy.deepcopy(base), cfg)
    perturb_vectors(model)
    dorakit.save_adapter(model, tmp_path)
    tensors = read_adapter_tensors(tmp_path)
    assert ("base_model.vera_A" in tensors) == save_projection
    assert any(k.endswith("lora_magnitude_vector") for k in tensors) == use_dora
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved.get("use_dora", False) == use_dora
    loaded = dorakit.load_adapter(copy.deepcopy(base), tmp_path)
    assert dorakit.read_adapter_config(tmp_path).method == ("dvora" if use_dora else "vera")
    with torch.no_grad():
        assert torch.equal(output_of(loaded, make_input()), output_of(model, make_input()))


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_files_round_trip_with_peft(tmp_path, save_projection):
    builder, make_input, targets = CASES["llama"]
    theirs, ours = vera_pair(builder, targets, save_projection=save_projection, projection_prng_key=2)
    with torch.no_grad():
        expected = output_of(theirs, make_input())
    # dorakit -> PEFT
    dorakit.save_adapter(ours, tmp_path / "ours")
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = peft.VeraConfig(r=4, target_modules=targets, save_projection=save_projection).to_dict()
    assert set(ours_cfg) - {"auto_mapping"} == set(peft_cfg) - {"auto_mapping"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(seeded(builder), tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(output_of(reloaded, make_input()), expected)
    # PEFT -> dorakit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_model = peft.get_peft_model(seeded(builder), peft.VeraConfig(r=4, target_modules=targets,
                                          save_projection=save_projection, projection_prng_key=2))
    perturb_vectors(their_model)
    their_model.save_pretrained(tmp_path / "theirs")
    loaded = dorakit.load_adapter(seeded(builder), tmp_path / "theirs")
    with torch.no_grad():  # same numbers, different op order (see the parity test): fp32 rounding apart
        assert rel_err(output_of(loaded, make_input()), output_of(their_model, make_input())) < 1e-6


def test_dvora_save_merged_and_unmerge(tmp_path):
    base, model, make_input = dvora("llama")
    with torch.no_grad():
        expected = output_of(model, make_input())
    dorakit.save_merged(model, tmp_path)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert rel_err(output_of(merged, make_input()), expected) < 1e-5
    dorakit.load_merged(merged, tmp_path)
    restored = dorakit.unload(merged)
    for (name, p), q in zip(restored.named_parameters(), base.parameters()):
        assert rel_err(p, q) < 1e-6, name


def test_norm_builds_no_out_by_in_temporary():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(320, 96))
    model = dorakit.inject_adapters(base, dorakit.DoraConfig(r=8, target_modules=["0"], direction="vera"))
    layer = model[0]
    with _LargestTensor() as probe:
        layer.row_norm()
    assert probe.largest < 96 * 320


def test_projection_is_shared_and_moves_once():
    _, model, _ = dvora("llama")
    projections = {id(layer.vera_projection) for _, layer in dorakit.adapter_layers(model)}
    assert len(projections) == 1
    moved = model.to(torch.float64)
    shared = {layer.vera_projection.vera_A.data_ptr() for _, layer in dorakit.adapter_layers(moved)}
    assert len(shared) == 1 and next(iter(moved.modules())) is moved
    copied = copy.deepcopy(model)
    assert len({id(layer.vera_projection) for _, layer in dorakit.adapter_layers(copied)}) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank_pattern={"fc1": 2}), "rank_pattern do not apply"),
        (dict(use_rslora=True), "use_rslora do not apply"),
        (dict(init_lora_weights="gaussian"), "init_lora_weights=True"),
        (dict(direction="verra"), "direction must be one of"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dorakit.DoraConfig(r=4, target_modules=["fc1"], **{"direction": "vera", **kwargs})


def test_vera_refuses_layers_it_cannot_adapt():
    from .conftest import EmbeddingNet

    model = seeded(EmbeddingNet)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot take a VeRA adapter.*exclude_modules"):
        dorakit.inject_adapters(model, dorakit.DoraConfig(r=4, target_modules=["emb", "head"], direction="vera"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_projection_files_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _, model, _ = dvora("llama")
    dorakit.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "base_model.vera_B"}, weights)
    with pytest.raises(ValueError, match="save_projection=true but lacks"):
        dorakit.load_adapter(seeded(tiny_llama), tmp_path)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :-1].contiguous()
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="base_model.vera_A is"):
        dorakit.load_adapter(seeded(tiny_llama), tmp_path)
