"""LoRA vs DoRA at rank 4 on a small MLP: pre-train on digits 0-4, adapt to digits 5-9.

    python examples/digits_lora_vs_dora.py --seeds 5

scikit-learn's bundled 8x8 digits (1,797 images; read from the installed package's data folder, no
download, no scikit-learn import). An MLP 64-128-128-10 is pre-trained on digits 0-4 only; its copy
is then fine-tuned on digits 5-9 with the base frozen and an adapter on every Linear (LoRA or DoRA,
r=4, alpha=8; Adam at 1e-2), or fully (Adam at 3e-3), for the same number of full-batch steps. Accuracy is on
held-out digits 5-9. The magnitude/direction correlation of each method's updates over its
checkpoints (dorakit.analysis.decomposition, the paper's Fig. 2 statistic) is printed beside it.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import statistics
from pathlib import Path

import torch
from torch import nn

import dorakit
from dorakit.analysis.decomposition import decomposition_change
from dorakit.analysis.report import pearson

SKLEARN_INSTALL = "pip install --no-deps scikit-learn==1.9.1   (or: make assets)"


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 64] scaled to [0, 1], labels [1797])."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise SystemExit(f"scikit-learn's bundled digits are needed: {SKLEARN_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    rows = [list(map(float, line.split(","))) for line in gzip.open(path, "rt") if line.strip()]
    data = torch.tensor(rows)
    return data[:, :64] / 16.0, data[:, 64].long()


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def fit(model: nn.Module, x, y, steps: int, lr: float, snapshots: list | None = None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(1, steps + 1):
        loss = nn.functional.cross_entropy(model(x), y)  # full batch: a few hundred images
        opt.zero_grad()
        loss.backward()
        opt.step()
        if snapshots is not None and step % max(1, steps // 5) == 0:
            snapshots.append(effective_weights(model))


def effective_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weight each Linear computes with (adapters merged into a copy)."""
    layers = dict(dorakit.adapter_layers(model))
    out = []
    for path, module in model.named_modules():
        if path in layers:
            merged = layers[path].base_layer.weight.detach().clone()
            layers[path].merge_into(merged)
            out.append(merged)
        elif isinstance(module, nn.Linear) and not any(path.startswith(p + ".") for p in layers):
            out.append(module.weight.detach().clone())
    return out


def accuracy(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def run(seed: int, steps: int) -> dict[str, tuple[float, float | None]]:
    x, y = digits()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order], y[order]
    old, new = y < 5, y >= 5
    x_new, y_new = x[new], y[new]
    cut = len(y_new) // 2
    torch.manual_seed(seed)
    base = mlp()
    fit(base, x[old], y[old], steps=100, lr=3e-3)  # pre-training on digits 0-4
    base_weights = effective_weights(base)
    results = {}
    methods = {"full": (None, 3e-3), "lora": (False, 1e-2), "dora": (True, 1e-2)}
    for name, (use_dora, lr) in methods.items():
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        if use_dora is not None:
            dorakit.inject_adapters(model, dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"],
                                                              use_dora=use_dora))
        snapshots: list = []
        fit(model, x_new[:cut], y_new[:cut], steps=steps, lr=lr, snapshots=snapshots)
        changes = [decomposition_change(w0, w) for weights in snapshots for w0, w in zip(base_weights, weights)]
        corr = pearson([d for _, d in changes], [m for m, _ in changes])
        results[name] = (accuracy(model, x_new[cut:], y_new[cut:]), corr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (full batch)")
    args = parser.parse_args()
    per_method: dict[str, list] = {}
    for seed in range(args.seeds):
        for name, value in run(seed, args.steps).items():
            per_method.setdefault(name, []).append(value)
    print(f"digits 5-9 after pre-training on 0-4; {args.steps} steps; {args.seeds} seeds; r=4 for LoRA/DoRA")
    print(f"{'method':<6} {'accuracy (mean ± std)':>22} {'corr(ΔD, ΔM) mean':>18}")
    for name, values in per_method.items():
        accs = [a for a, _ in values]
        corrs = [c for _, c in values if c is not None]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        corr = f"{statistics.mean(corrs):+.2f}" if corrs else "n/a"
        print(f"{name:<6} {statistics.mean(accs):>15.1%} ± {spread:.1%} {corr:>18}")


if __name__ == "__main__":
    main()
