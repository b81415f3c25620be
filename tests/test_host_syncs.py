"""No host syncs in DoRA's hot path (issue 18): a training step (forward and backward) and inference
forwards read nothing back from the device, on every layer type, eager and under torch.compile.

On a GPU, every op whose result (or output shape) the host must know before it can go on drains the
launch queue: ``.item()``, ``bool(tensor)``, ``nonzero``, boolean-mask indexing. The CPU cannot show
that as time, but it shows the ops: a dispatch-mode probe counts them in a step of the adapted model
and in the same step of the bare base model, and the adapter may add none. Compiled models are checked
on the ATen graphs that torch.compile would hand to its compiler (forward and backward), with no graph
breaks and no recompilation from one optimizer step to the next.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.fx.node import map_arg
from torch.utils._python_dispatch import TorchDispatchMode

import dorakit

from . import test_experts as _experts, test_mha as _mha
from .conftest import EXTRA_CASES, TOY_CASES, output_of, perturb_adapters, seeded, tiny_llama

# Ops that read a device value on the host (their result, or their output's size, depends on data).
SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal", "allclose",
           "unique_dim", "_unique", "_unique2", "unique_consecutive", "repeat_interleave"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"}
COPIES = {"_to_copy", "copy_", "to"}


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def syncing_op(func, args, kwargs) -> str | None:
    """The name under which ``func(*args, **kwargs)`` counts as a host sync, or None."""
    name = func._schema.name.split("::")[-1]
    if name in SYNCING:
        if name == "repeat_interleave" and kwargs.get("output_size") is not None:
            return None  # the output size is known: no sync
        return name
    if name in INDEXING and len(args) > 1 and any(_is_mask(i) for i in (args[1] or ())):
        return f"{name} (boolean mask)"
    if name in COPIES:
        source = args[1] if name == "copy_" else args[0]
        target = args[0] if name == "copy_" else kwargs.get("device")
        target_device = target.device if isinstance(target, torch.Tensor) else target
        if isinstance(source, torch.Tensor) and source.device.type != "cpu" and str(target_device) == "cpu":
            return f"{name} (device to host)"
    return None


class SyncProbe(TorchDispatchMode):
    """Counts the syncing ATen ops run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = syncing_op(func, args, kwargs)
        if name is not None:
            self.counts[name] += 1
        return func(*args, **kwargs)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


def _llama_ids():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


# name -> (base builder, inputs, DoraConfig keywords). Every layer type dorakit wraps.
CASES = {name: (builder, inputs, {"target_modules": targets}) for name, (builder, inputs, targets) in TOY_CASES.items()}
CASES["conv2d_groups"] = (EXTRA_CASES["conv2d_groups"][0], EXTRA_CASES["conv2d_groups"][1], {"target_modules": ["conv1", "conv2"]})
CASES["gpt2_conv1d"] = (EXTRA_CASES["gpt2_conv1d"][0], EXTRA_CASES["gpt2_conv1d"][1],
                        {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True})
CASES["dvora"] = (TOY_CASES["linear"][0], TOY_CASES["linear"][1], {"target_modules": ["fc1", "fc2"], "direction": "vera"})
CASES["llama"] = (tiny_llama, _llama_ids, {"target_modules": LLAMA_TARGETS})
CASES["llama_dropout"] = (tiny_llama, _llama_ids, {"target_modules": LLAMA_TARGETS, "lora_dropout": 0.1})
CASES["llama_lora"] = (tiny_llama, _llama_ids, {"target_modules": LLAMA_TARGETS, "use_dora": False})
# Issue 17's layers: expert stacks (routed, and gpt-oss's transposed layout) and nn.MultiheadAttention.
CASES["qwen3_moe_experts"] = (lambda: _experts.build("qwen3_moe"), _experts.ids,
                              {"target_modules": ["q_proj", "v_proj"], "target_parameters": _experts.EXPERTS})
CASES["gpt_oss_experts"] = (lambda: _experts.build("gpt_oss"), _experts.ids, {"target_parameters": _experts.EXPERTS})
CASES["multihead_attention"] = (_mha.build, _mha.inputs, {"target_modules": ["attn"]})


def adapted_pair(name: str):
    """(base model, adapted copy, inputs) for one case, the adapter moved off its identity init."""
    builder, inputs, extra = CASES[name]
    base = seeded(builder)
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=4, lora_alpha=8, **extra))
    perturb_adapters(model)
    return base, model, inputs()


def loss_of(model, inputs):
    return output_of(model, inputs).float().square().mean()


def probe_steps(model, inputs) -> dict[str, collections.Counter]:
    """Syncing ops in two training steps (forward + backward; an optimizer step between them, outside
    the probe, so that the second recomputes the norm) and two inference forwards (the first after the
    update, the second from the cache)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    counts = {}
    model.train()
    for step in range(2):
        with SyncProbe() as probe:
            loss_of(model, inputs).backward()
        counts[f"train step {step}"] = probe.counts
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for step in range(2):
        with SyncProbe() as probe, torch.no_grad():
            output_of(model, inputs)
        counts[f"inference forward {step}"] = probe.counts
    return counts


def extra_syncs(name: str) -> dict[str, dict]:
    base, model, inputs = adapted_pair(name)
    ours, theirs = probe_steps(model, inputs), probe_steps(base, inputs)
    return {phase: dict(ours[phase] - theirs[phase]) for phase in ours if ours[phase] - theirs[phase]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_host_syncs_beyond_the_base_model(name):
    assert extra_syncs(name) == {}


def test_no_host_syncs_over_a_quantized_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from dorakit.integrations.bitsandbytes import Quantization
    from dorakit.integrations.transformers import load_pretrained

    from .test_quantized import quantized_llama_dir

    path = quantized_llama_dir(tmp_path)
    for quantization in (Quantization(4, "nf4", True), Quantization(8)):
        base = load_pretrained(path, "float32", quantization)
        model = dorakit.inject_adapters(load_pretrained(path, "float32", quantization),
                                        dorakit.DoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        perturb_adapters(model)
        ids = _llama_ids()
        ours, theirs = probe_steps(model, ids), probe_steps(base, ids)
        extra = {phase: dict(ours[phase] - theirs[phase]) for phase in ours if ours[phase] - theirs[phase]}
        assert extra == {}, quantization


# ---- compiled ----------------------------------------------------------------------------------------------------


class GraphRecorder:
    """A torch.compile backend that keeps the ATen graphs (forward, backward, inference) it is given
    and runs them as they are (the aot_eager backend, plus bookkeeping)."""

    def __init__(self) -> None:
        from torch._dynamo.backends.common import aot_autograd

        self.graphs: list[torch.fx.GraphModule] = []
        self.backend = aot_autograd(fw_compiler=self._keep, bw_compiler=self._keep)

    def _keep(self, gm: torch.fx.GraphModule, example_inputs):
        from functorch.compile import make_boxed_func

        self.graphs.append(gm)
        return make_boxed_func(gm.forward)

    def syncing_nodes(self) -> collections.Counter:
        counts = collections.Counter()
        for gm in self.graphs:
            for node in gm.graph.nodes:
                if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                    values = map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
                    name = syncing_op(node.target, *values)
                    if name is not None:
                        counts[name] += 1
        return counts


def compiled_run(model, inputs, steps: int = 3) -> tuple[GraphRecorder, list[int], int]:
    """Train ``steps`` compiled steps (optimizer steps between), then two compiled inference forwards.
    Returns the recorder, the number of graphs after each step, and the graph breaks."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder.backend)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    graphs_after = []
    for _ in range(steps):
        loss_of(compiled, inputs).backward()
        optimizer.step()
        optimizer.zero_grad()
        graphs_after.append(len(recorder.graphs))
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            output_of(compiled, inputs)
    graphs_after.append(len(recorder.graphs))
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return recorder, graphs_after, breaks


@pytest.mark.parametrize("name", ["llama", "conv2d", "dvora", pytest.param("gpt2_conv1d", marks=pytest.mark.slow)])
def test_compiled_training_and_inference_have_no_syncs_breaks_or_recompiles(name):
    """These base models compile to graphs without syncs or breaks, so the adapted ones must too."""
    _, model, inputs = adapted_pair(name)
    recorder, graphs_after, breaks = compiled_run(model, inputs)
    assert breaks == 0
    assert recorder.syncing_nodes() == collections.Counter()
    # One forward and one backward graph for training, one inference graph for eval; optimizer steps
    # (which the norm cache counts) must not make torch.compile trace again.
    assert graphs_after[0] == graphs_after[1] == graphs_after[2] == 2, graphs_after
    assert graphs_after[3] == 3, graphs_after
