"""`dorakit convert` in a subprocess (issue 16): exact conversions between PEFT, diffusers and kohya files, the
refusal of inexact ones with the reason (exit 2), and --approximate's reported error."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import dorakit
from dorakit.formats.peft import WEIGHTS_NAME

from .conftest import rel_err
from .diffusion_models import UNET_TARGETS, perturb, tiny_unet, unet_inputs

pytest.importorskip("diffusers")


def run(*args):
    """The command as a user runs it: a subprocess (a few seconds of start-up each)."""
    return subprocess.run([sys.executable, "-m", "dorakit", "convert", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def main(capsys, *args) -> tuple[int, str, str]:
    """The same command in this process: (exit code, stdout, stderr)."""
    from dorakit.cli import main as cli_main

    try:
        cli_main(["convert", *map(str, args)])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def tensors(path):
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


@pytest.fixture(scope="module")
def unet_base(tmp_path_factory):
    base = tiny_unet()
    directory = tmp_path_factory.mktemp("base")
    base.save_pretrained(directory)  # diffusion_pytorch_model.safetensors + config.json
    return base, directory


def test_peft_to_diffusers_to_kohya_to_peft_is_exact(tmp_path, unet_base, capsys):
    base, _ = unet_base
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(
        r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False, rank_pattern={"conv2": 2}))
    perturb(model)
    dorakit.save_adapter(model, tmp_path / "peft")
    done = run(tmp_path / "peft", "--to", "diffusers", "--out", tmp_path / "diffusers")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("converted peft")
    assert main(capsys, tmp_path / "diffusers", "--to", "kohya", "--out", tmp_path / "k.safetensors")[0] == 0
    code, _, err = main(capsys, tmp_path / "k.safetensors", "--to", "peft", "--out", tmp_path / "back")
    assert code == 0, err
    original, back = tensors(tmp_path / "peft" / WEIGHTS_NAME), tensors(tmp_path / "back" / WEIGHTS_NAME)
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
    again = dorakit.load_adapter(copy.deepcopy(base), tmp_path / "back")
    assert torch.equal(again(*unet_inputs()).sample, model(*unet_inputs()).sample)


def test_input_axis_is_refused_with_the_reason_then_approximated(tmp_path, unet_base, capsys):
    base, base_dir = unet_base
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_v", "conv1"], magnitude_axis="in", init_lora_weights=False))
    perturb(model)
    dorakit.save_kohya(model, tmp_path / "legacy.safetensors")
    refused = run(tmp_path / "legacy.safetensors", "--to", "peft", "--out", tmp_path / "peft")
    assert refused.returncode == 2 and "input axis" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "peft").exists()
    code, _, err = main(capsys, tmp_path / "legacy.safetensors", "--to", "diffusers", "--out", tmp_path / "d", "--approximate")
    assert code == 2 and "--base" in err
    code, out, err = main(capsys, tmp_path / "legacy.safetensors", "--to", "peft", "--out", tmp_path / "peft",
                          "--approximate", "--base", base_dir)
    assert code == 0, err
    report = next(line for line in out.splitlines() if line.startswith("approximated"))
    worst = float(report.split("worst ")[1].split()[0])
    fitted = dorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert fitted.dorakit_config.magnitude_axis == "out"
    # Per layer, the fitted weight differs from the input-axis one by at most the reported share of its change.
    layer, ours = fitted.down_blocks[0].resnets[0].conv1, model.down_blocks[0].resnets[0].conv1
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge(), ours.merge()
    change = (ours.base_layer.weight - w0).norm()
    assert (layer.base_layer.weight - ours.base_layer.weight).norm() <= worst * change * (1 + 1e-3)


def test_usage_errors_exit_2(tmp_path, capsys):
    generic = torch.nn.Sequential(torch.nn.Linear(4, 4))
    dorakit.save_adapter(dorakit.inject_adapters(generic, dorakit.DoraConfig(r=2, lora_alpha=4, target_modules=["0"])),
                         tmp_path / "peft")
    code, _, err = main(capsys, tmp_path / "peft", "--to", "kohya", "--out", tmp_path / "k.safetensors")
    assert code == 2 and "--component unet" in err
    assert main(capsys, tmp_path / "peft", "--to", "kohya", "--out", tmp_path / "k.safetensors", "--component", "unet")[0] == 0
    code, _, err = main(capsys, tmp_path / "peft", "--to", "kohya", "--out", tmp_path / "k.safetensors", "--component", "unet")
    assert code == 2 and "--overwrite" in err
    code, _, err = main(capsys, tmp_path / "nothing", "--to", "peft", "--out", tmp_path / "x")
    assert code == 2 and "does not exist" in err


def test_text_encoder_kohya_to_peft_names_modules_as_the_base_does(tmp_path, capsys):
    from .diffusion_models import CLIP_TARGETS, clip_inputs, tiny_clip_text

    base = tiny_clip_text()
    base.save_pretrained(tmp_path / "te")  # transformers 5: no text_model level in the names
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(
        r=2, lora_alpha=6, target_modules=CLIP_TARGETS, init_lora_weights=False))
    perturb(model)
    dorakit.save_kohya(model, tmp_path / "te.safetensors")
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in tensors(tmp_path / "te.safetensors")
    code, _, err = main(capsys, tmp_path / "te.safetensors", "--to", "peft", "--out", tmp_path / "peft", "--base",
                        tmp_path / "te")
    assert code == 0, err
    assert "base_model.model.encoder.layers.0.mlp.fc1.lora_A.weight" in tensors(tmp_path / "peft" / WEIGHTS_NAME)
    again = dorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    ids = clip_inputs()
    assert rel_err(again(ids).last_hidden_state, model(ids).last_hidden_state) < 1e-6
