"""The magnitude/direction analysis: synthetic updates of known effect, adapters merged on the fly,
full checkpoints, and `dorakit analyze` end to end."""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys

import pytest
import torch

import dorakit
from dorakit.analysis.decomposition import analyse, decomposition_change, layer_index

from .conftest import perturb_adapters, seeded, tiny_llama

transformers = pytest.importorskip("transformers")


def test_a_pure_rescale_changes_only_the_magnitude():
    w0 = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.rand(16, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    dm, dd = decomposition_change(w0, c * w0)
    assert dd < 1e-12
    assert dm == pytest.approx(((c.squeeze(1) - 1).abs() * w0.norm(dim=1)).mean().item(), rel=1e-9)


def test_a_pure_rotation_of_rows_changes_only_the_direction():
    w0 = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    w = w0 @ q.T  # every row rotated by the same orthogonal map: norms kept
    dm, dd = decomposition_change(w0, w)
    assert dm < 1e-12
    expected = (1 - (w0 * w).sum(1) / (w0.norm(dim=1) * w.norm(dim=1))).mean().item()
    assert dd == pytest.approx(expected, rel=1e-9) and dd > 0.1


def test_a_known_mix_gives_the_closed_form():
    r = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)  # base magnitudes, direction e1
    s = torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64)  # new magnitudes
    theta = torch.tensor([0.0, math.pi / 3, math.pi / 2], dtype=torch.float64)
    w0 = torch.stack([r, torch.zeros(3, dtype=torch.float64)], 1)
    w = torch.stack([s * theta.cos(), s * theta.sin()], 1)
    dm, dd = decomposition_change(w0, w)
    assert dm == pytest.approx((0.5 + 1.0 + 0.0) / 3, abs=1e-12)
    assert dd == pytest.approx((0.0 + 0.5 + 1.0) / 3, abs=1e-12)


def test_zero_rows_and_shape_errors():
    w0 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert decomposition_change(w0, torch.tensor([[0.0, 2.0], [1.0, 0.0]])) == (1.0, 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        decomposition_change(w0, torch.zeros(3, 2))
    assert layer_index("model.layers.12.self_attn.q_proj") == 12 and layer_index("lm_head") is None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    base = seeded(tiny_llama)
    base.save_pretrained(root / "base")
    targets = ["q_proj", "v_proj"]
    # DoRA with only the magnitude moved: every row keeps its direction.
    dora = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_modules=targets))
    with torch.no_grad():
        for _, layer in dorakit.adapter_layers(dora):
            layer.lora_magnitude_vector.mul_(1.25)
    dorakit.save_adapter(dora, root / "dora-step-10")
    lora = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_modules=targets, use_dora=False))
    perturb_adapters(lora)
    dorakit.save_adapter(lora, root / "lora-step-20")
    full = copy.deepcopy(base)
    with torch.no_grad():
        full.model.layers[1].self_attn.q_proj.weight.mul_(2.0)
    full.save_pretrained(root / "full-step-30")
    return root, base


def test_adapters_and_full_checkpoints(checkpoints):
    root, base = checkpoints
    rows = analyse(root / "base", [root / "dora-step-10", root / "lora-step-20", root / "full-step-30"])
    assert len(rows) == 3 * 2 * 2  # checkpoints x layers x modules
    q0 = base.model.layers[0].self_attn.q_proj.weight
    dora = {(r.layer, r.module): r for r in rows if r.method == "dora"}
    assert all(r.delta_d < 1e-6 and r.step == 10 for r in dora.values())
    assert dora[(0, "q_proj")].delta_m == pytest.approx(0.25 * q0.norm(dim=1).mean().item(), rel=1e-5)
    lora = [r for r in rows if r.method == "lora"]
    assert all(r.delta_d > 0 and r.delta_m > 0 for r in lora)
    full = {(r.layer, r.module): r for r in rows if r.method == "full"}
    assert full[(0, "q_proj")].delta_m == 0 and full[(0, "v_proj")].delta_d < 1e-15  # unchanged weights
    q1 = base.model.layers[1].self_attn.q_proj.weight
    assert full[(1, "q_proj")].delta_m == pytest.approx(q1.norm(dim=1).mean().item(), rel=1e-5)
    assert full[(1, "q_proj")].delta_d < 1e-6


def test_analyze_command_writes_csv_json_and_plot(checkpoints, tmp_path):
    root, _ = checkpoints
    done = subprocess.run([sys.executable, "-m", "dorakit", "analyze", "--base", str(root / "base"),
                           "--checkpoints", str(root / "dora-step-10"), str(root / "lora-step-20"),
                           str(root / "full-step-30"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "analysis.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 12
    assert {"checkpoint", "layer", "module", "delta_m", "delta_d"} <= set(table[0])
    summary = json.loads((tmp_path / "analysis.json").read_text())["summary"]
    assert set(summary) == {"dora", "lora", "full"} and summary["lora"]["all"]["points"] == 4
    assert (tmp_path / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    assert "corr(ΔD, ΔM)" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "dorakit", "analyze", "--base", str(root / "base"),
                              "--checkpoints", str(root / "nothing"), "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_compare_runs_every_method_and_seed(tmp_path):
    from dorakit.analysis.compare import METHODS
    from .train_assets import colour_records, make_model_dir, write_jsonl

    make_model_dir(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", colour_records(120))
    done = subprocess.run([sys.executable, "-m", "dorakit", "compare", "--model", str(tmp_path / "model"),
                           "--data", str(tmp_path / "train.jsonl"), "--ranks", "4", "--seeds", "0", "1",
                           "--max-steps", "6", "--batch-size", "8", "--lr", "1e-2", "--full-lr", "1e-3",
                           "--methods", *METHODS, "--vera-ranks", "16", "--vera-lr", "5e-2",
                           "--output", str(tmp_path / "cmp")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in result["runs"]) == sorted((m, s) for m in METHODS for s in (0, 1))
    assert all("error" not in r and 0 <= r["accuracy"] <= 1 for r in result["runs"])
    rows = {r["method"]: r for r in result["table"]}
    assert rows["full"]["trainable_parameters"] > rows["dora"]["trainable_parameters"] > rows["dora-half"]["trainable_parameters"]
    assert rows["lora"]["trainable_parameters"] > rows["dvora"]["trainable_parameters"] > rows["vera"]["trainable_parameters"]
    assert rows["vera"]["rank"] == 16
    vera_run = json.loads((tmp_path / "cmp" / "vera-r16-s0" / "summary.json").read_text())
    assert vera_run["config"]["lr"] == 5e-2 and vera_run["config"]["method"] == "vera"
    assert all(r["seeds"] == 2 for r in rows.values())
    for method in METHODS:
        assert method in done.stdout
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_dvora_adapters_are_analysed_like_their_merge(checkpoints, tmp_path):
    from dorakit.analysis.decomposition import decomposition_change

    root, base = checkpoints
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=4, target_modules=["q_proj"], direction="vera"))
    with torch.no_grad():
        for _, layer in dorakit.adapter_layers(model):
            layer.vera_lambda_b.normal_(0, 0.05)
            layer.lora_magnitude_vector.mul_(1.1)
    dorakit.save_adapter(model, tmp_path / "dvora")
    merged = dorakit.merge_and_unload(model)
    rows = analyse(root / "base", [tmp_path / "dvora"], ["q_proj"])
    assert {r.method for r in rows} == {"dvora"} and len(rows) == 2
    for row in rows:
        layer = row.layer
        expected = decomposition_change(base.model.layers[layer].self_attn.q_proj.weight,
                                        merged.model.layers[layer].self_attn.q_proj.weight)
        assert row.delta_m == pytest.approx(expected[0], rel=1e-5) and row.delta_d == pytest.approx(expected[1], rel=1e-5)


def test_tensor_merge_matches_the_layers_and_prefixes_are_matched(checkpoints, tmp_path):
    from dorakit.analysis.decomposition import decomposition_change

    root, base = checkpoints
    merged = dorakit.merge_and_unload(dorakit.load_adapter(copy.deepcopy(base), root / "lora-step-20"))
    q0, q = base.model.layers[0].self_attn.q_proj.weight, merged.model.layers[0].self_attn.q_proj.weight
    expected = decomposition_change(q0, q)
    base.model.save_pretrained(tmp_path / "backbone")  # keys without the "model." of the causal LM class
    rows = analyse(tmp_path / "backbone", [root / "lora-step-20", root / "full-step-30"], ["q_proj"])
    got = next(r for r in rows if r.method == "lora" and r.layer == 0)
    assert got.name == "layers.0.self_attn.q_proj"
    assert got.delta_m == pytest.approx(expected[0], rel=1e-5) and got.delta_d == pytest.approx(expected[1], rel=1e-5)
    assert next(r for r in rows if r.method == "full" and r.layer == 1).delta_m > 0
