"""DoRA and LoRA on expert stacks and other parameters (``target_parameters``, issue 17), on tiny
Qwen3-MoE, Mixtral and gpt-oss models built from configs. The references are computed here, per
expert, in fp64, from the formula W_e' = m_e (W_e + s B_e A_e) / ||W_e + s B_e A_e||_row; PEFT is the
oracle for the LoRA case and for the file layout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dorakit
from dorakit import functional as F_dora
from dorakit import functional_experts as F_experts
from dorakit.formats.keys import adapter_state_dict, from_peft_key
from dorakit.layers import ParameterAdapter

from .conftest import perturb_adapters as perturb, rel_err

transformers = pytest.importorskip("transformers")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
              max_position_embeddings=64, head_dim=8, tie_word_embeddings=False)


def qwen3_moe(num_experts: int = 4):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=num_experts,
                                              num_experts_per_tok=2, **COMMON))


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **COMMON))


def gpt_oss():  # experts stored transposed ([E, in, out]) with biases, gate and up interleaved
    from transformers import GptOssConfig, GptOssForCausalLM

    return GptOssForCausalLM(GptOssConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **COMMON))


MODELS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral, "gpt_oss": gpt_oss}


def build(name: str, dtype=torch.float32):
    """A tiny model with seeded expert weights and biases (transformers leaves some at zero), and one
    all-zero output row in an expert (zero rows exist in real checkpoints)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval().to(dtype)
    if dtype == torch.float64:
        model.set_experts_implementation("eager")  # grouped_mm has no fp64 kernel
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.dim() == 3 or pname.endswith("_bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen, dtype=dtype))
        experts = model.model.layers[0].mlp.experts
        rows = experts.down_proj.transpose(1, 2) if experts.is_transposed else experts.down_proj
        rows[1, 3].zero_()
    return model


def ids(batch: int = 2, length: int = 9):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(2))


def expert_layers(model) -> list[ParameterAdapter]:
    return [layer for _, layer in dorakit.adapter_layers(model) if isinstance(layer, ParameterAdapter)]


def reference_weights(model) -> dict[str, torch.Tensor]:
    """Each adapted parameter as the per-expert formula gives it, in fp64, keyed by its plain path."""
    out = {}
    for path, layer in dorakit.adapter_layers(model):
        if not isinstance(layer, ParameterAdapter):
            continue
        weight = layer.base_weight().detach().double()
        rows = weight.transpose(1, 2) if layer.transposed else weight  # [E, out, in]
        experts, r = layer.num_experts, layer.r
        a = layer.lora_A.weight.detach().double().reshape(experts, r, -1)
        b = layer.lora_B.weight.detach().double().reshape(-1, r, experts)
        new = torch.empty_like(rows)
        for e in range(experts):
            v = rows[e] + layer.scaling * b[:, :, e] @ a[e]
            if layer.use_dora:
                m = layer.lora_magnitude_vector.detach().double()[e]
                v = m[:, None] * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            new[e] = v
        plain = path.replace(".base_layer", "") + "." + layer.parameter_name
        out[plain] = new.transpose(1, 2) if layer.transposed else new
    return out


def with_weights(base, weights: dict[str, torch.Tensor]):
    model = copy.deepcopy(base).double()
    state = model.state_dict()
    with torch.no_grad():
        for key, value in weights.items():
            state[key].copy_(value)
    return model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("use_dora", [True, False])
def test_identity_at_init(name, use_dora):
    base = build(name)
    model = dorakit.inject_adapters(copy.deepcopy(base),
                                    dorakit.DoraConfig(r=2, target_parameters=EXPERTS, use_dora=use_dora))
    assert len(expert_layers(model)) == 4
    torch.testing.assert_close(model(ids()).logits, base(ids()).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_equal_the_per_expert_formula_in_fp64(name):
    base = build(name, torch.float64)
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=3, lora_alpha=5, target_parameters=EXPERTS))
    perturb(model)
    expected = with_weights(base, reference_weights(model))(ids()).logits
    assert rel_err(model(ids()).logits, expected) < 1e-6  # the norm is accumulated in fp32 by design


class Half(torch.nn.Module):
    """A deterministic stand-in for dropout: x' = x / 2."""

    def forward(self, x):
        return x / 2


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_dropout_path_is_the_papers_compose(name):
    """With dropout, y = x W^T + (g - 1) x' W^T + g s B A x' per expert (paper and PEFT): for x' = x/2
    that is the weight ((1 + g)/2) W + (g s / 2) B A."""
    base = build(name, torch.float64)
    model = dorakit.inject_adapters(copy.deepcopy(base),
                                    dorakit.DoraConfig(r=2, lora_dropout=0.1, target_parameters=EXPERTS))
    perturb(model)
    weights = {}
    for path, layer in dorakit.adapter_layers(model):
        layer.lora_dropout = Half()
        w = layer.base_weight().detach()
        rows = w.transpose(1, 2) if layer.transposed else w
        g = layer.dora_scale().detach()
        update = layer.scaling * torch.bmm(layer.lora_B_rows().detach(), layer.lora_A_rows().detach())
        new = ((1 + g) / 2).unsqueeze(-1) * rows + (g / 2).unsqueeze(-1) * update
        weights[path.replace(".base_layer", "") + "." + layer.parameter_name] = new.transpose(1, 2) if layer.transposed else new
    model.train()
    assert rel_err(model(ids()).logits, with_weights(base, weights)(ids()).logits) < 1e-12


@pytest.mark.parametrize("name", list(MODELS))
def test_lora_on_experts_matches_peft_and_files_round_trip(name, tmp_path):
    peft = pytest.importorskip("peft")
    base = build(name)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                                      target_parameters=EXPERTS))
    perturb(theirs)
    ours = dorakit.inject_adapters(copy.deepcopy(base),
                                   dorakit.DoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS, use_dora=False))
    state = {from_peft_key(k): v for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert set(state) == set(adapter_state_dict(ours))  # same keys and nesting as PEFT's wrappers
    ours.load_state_dict(state, strict=False)
    out_theirs, out_ours = theirs(input_ids=ids()).logits, ours(ids()).logits
    assert rel_err(out_ours, out_theirs) < 1e-6 and rel_err(out_ours, base(ids()).logits) > 1e-2
    out_theirs.square().sum().backward()
    out_ours.square().sum().backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, grads[n]) < 1e-5, n

    dorakit.save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert rel_err(loaded(input_ids=ids()).logits, out_ours) < 1e-6
    theirs.save_pretrained(tmp_path / "theirs")
    back = dorakit.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert rel_err(back(ids()).logits, out_theirs) < 1e-6


@pytest.mark.parametrize("name", list(MODELS))
def test_merge_unmerge_and_merged_checkpoint_are_exact(name, tmp_path):
    base = build(name)
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_parameters=EXPERTS))
    perturb(model)
    adapted = model(ids()).logits
    for layer in expert_layers(model):
        layer.merge()
        layer.merge()  # idempotent
    assert rel_err(model(ids()).logits, adapted) < 1e-6
    for layer in expert_layers(model):
        layer.unmerge()
    assert rel_err(model(ids()).logits, adapted) < 1e-6
    for layer in expert_layers(model):
        assert rel_err(layer.base_weight(), base.state_dict()[_plain(model, layer)]) < 1e-6

    dorakit.save_merged(model, tmp_path / "merged")
    plain = type(base).from_pretrained(tmp_path / "merged").eval()
    assert rel_err(plain(ids()).logits, adapted) < 1e-6
    dorakit.load_merged(plain, tmp_path / "merged")
    dorakit.unload(plain)  # in another "process": the saved row norms undo the merge
    for key, value in base.state_dict().items():
        assert rel_err(plain.state_dict()[key], value) < 1e-6, key

    unloaded = dorakit.merge_and_unload(model)
    assert type(unloaded.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    assert rel_err(unloaded(ids()).logits, adapted) < 1e-6


def _plain(model, layer) -> str:
    path = next(p for p, m in model.named_modules() if m is layer)
    return path.replace(".base_layer", "") + "." + layer.parameter_name


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (views of its inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.largest = max(self.largest, t.numel())
        return out


def test_training_step_never_builds_the_adapted_expert_stack():
    """PEFT's LoRA builds W + s B A ([E, out, in]) every forward; the routed forward never does."""
    peft = pytest.importorskip("peft")
    base = build("qwen3_moe")
    stack = base.model.layers[0].mlp.experts.gate_up_proj.numel()
    models = {
        "dorakit": dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_parameters=EXPERTS)),
        "peft": peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=[],
                                                                         target_parameters=EXPERTS)),
    }
    largest = {}
    for name, model in models.items():
        model.train()
        with LargestTensor() as probe:
            model(input_ids=ids(1, 4), labels=ids(1, 4)).loss.backward()
        largest[name] = probe.largest
    assert largest["peft"] >= stack > largest["dorakit"], (largest, stack)


def test_norms_stay_fresh_through_fused_adamw(tmp_path):
    base = build("qwen3_moe")
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_parameters=EXPERTS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    model.train()
    for _ in range(3):
        model(input_ids=ids(), labels=ids()).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    dorakit.save_adapter(model, tmp_path / "a")
    fresh = dorakit.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert rel_err(model(ids()).logits, fresh(ids()).logits) < 1e-6
    assert rel_err(model(ids()).logits, base(ids()).logits) > 1e-3


def test_a_2d_parameter_router_weight():
    """A 2-D parameter its module reads itself (the router): the adapted weight is substituted."""
    base = build("qwen3_moe", torch.float64)
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_parameters=["mlp.gate.weight"]))
    assert rel_err(model(ids()).logits, base(ids()).logits) < 1e-12
    perturb(model)
    weights = {}
    for path, layer in dorakit.adapter_layers(model):
        w = layer.base_weight().detach()
        v = w + layer.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
        weights[f"{path}.weight"] = layer.lora_magnitude_vector.detach()[:, None] * v / v.norm(dim=1, keepdim=True)
    out = model(ids()).logits
    assert rel_err(out, with_weights(base, weights)(ids()).logits) < 1e-6  # fp32 norm
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class Stack(torch.nn.Module):
    """A module of no known convention with a 3-D parameter it reads itself (sums x @ W[e] over e)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 4, 5, dtype=torch.float64))

    def forward(self, x):
        return torch.einsum("ni,eio->no", x, self.w)


def test_a_3d_parameter_of_an_unknown_module_is_substituted_with_a_warning():
    torch.manual_seed(0)
    model = torch.nn.Sequential(Stack())
    x = torch.randn(2, 4, dtype=torch.float64)
    base = model(x)
    with pytest.warns(UserWarning, match="is_transposed"):
        dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, target_parameters=["0.w"]))
    assert rel_err(model(x), base) < 1e-12
    perturb(model)
    layer = model[0]
    weights = reference_weights(model)  # rows along dim 1, per expert: PEFT's reading of [E, d1, d2]
    expected = torch.einsum("ni,eio->no", x, weights["0.w"])
    assert rel_err(model(x), expected) < 1e-6 and layer.routed is False


def test_batched_norm_is_exact_chunked_and_safe_on_cancelled_and_zero_rows():
    gen = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*s, generator=gen) for s in ((5, 6, 7), (5, 2, 7), (5, 6, 2)))
    w[2, 4].zero_()
    b[2, 4].zero_()  # a zero row that stays zero
    w[3, 1] = -0.5 * (b[3, 1] @ a[3]) + 1e-4 * torch.randn(7, generator=gen)  # the update cancels this row
    exact = (w.double() + 0.5 * torch.bmm(b.double(), a.double())).norm(dim=-1)  # [E, out], formed directly
    norm = F_experts.expert_row_norm(w, a, b, 0.5)
    assert torch.allclose(norm.double(), exact.clamp_min(1e-12), rtol=1e-5, atol=0)
    assert rel_err(norm[3, 1], exact[3, 1]) < 1e-5 and norm[2, 4] == 1e-12  # cancelled row exact; zero row clamped
    per_expert = torch.stack([F_dora.dora_row_norm(w[e], a[e], b[e], 0.5) for e in range(5)])
    assert torch.allclose(norm, per_expert, rtol=1e-6, atol=0)  # the dense layers' norm, expert by expert
    bf16 = F_experts.expert_row_norm(w.bfloat16(), a, b, 0.5)
    for chunk in (7, 20, 50, 100):  # below one row, below one expert, a few experts: the same numbers
        assert torch.equal(F_experts.expert_row_norm(w.bfloat16(), a, b, 0.5, chunk_elements=chunk), bf16)


# ---- bad input: a clear error, and the model untouched ---------------------------------------------------

def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_untouched(model, before):
    state, types = before
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and len(state) == len(model.state_dict())


@pytest.mark.parametrize("config, message", [
    (dict(target_parameters=["experts.gate_proj"]), "match no parameter"),
    (dict(target_parameters=["input_layernorm.weight"]), "only 2-D"),
    (dict(target_modules=["q_proj"], target_parameters=["q_proj.weight"]), "target_modules already adapts"),
    (dict(target_parameters=["mlp.gate.weight"], lora_dropout=0.1), "lora_dropout"),
])
def test_bad_targets_are_clear_errors_and_leave_the_model_untouched(config, message):
    model = build("qwen3_moe")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, **config))
    assert_untouched(model, before)


def test_target_parameters_must_be_a_list():
    with pytest.raises(ValueError, match="target_parameters must be a list"):
        dorakit.DoraConfig(target_parameters="experts.gate_up_proj")


@pytest.mark.parametrize("use_dora", [True, False])
def test_an_adapter_for_another_expert_count_is_refused(tmp_path, use_dora):
    trained = dorakit.inject_adapters(qwen3_moe(4), dorakit.DoraConfig(r=2, target_parameters=EXPERTS, use_dora=use_dora))
    dorakit.save_adapter(trained, tmp_path / "a")
    other = qwen3_moe(8)
    before = snapshot(other)
    with pytest.raises(ValueError, match="made for 4 experts but this model's 'gate_up_proj' has 8"):
        dorakit.load_adapter(other, tmp_path / "a")
    assert_untouched(other, before)


# ---- the command line on a mixture-of-experts model -------------------------------------------------------

def make_moe_dir(path):
    """A tiny Qwen3-MoE checkpoint with the word-level tokenizer of the training tests."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from .train_assets import make_tokenizer

    tok = make_tokenizer()
    cfg = Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                         num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, vocab_size=len(tok), max_position_embeddings=128, tie_word_embeddings=False,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dorakit", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_train_and_analyze_a_moe_model_from_the_command_line(tmp_path):
    """`dorakit train` with nothing but a MoE model and data adapts the experts too; `analyze` reports
    the magnitude and direction change of every expert."""
    import csv
    import json

    from .train_assets import colour_records, write_jsonl

    make_moe_dir(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", colour_records(64))
    done = run("train", "--model", tmp_path / "model", "--data", tmp_path / "train.jsonl", "--output", tmp_path / "run",
               "--max-steps", 8, "--batch-size", 8, "--lr", 1e-2, "--eval-every", 0, "--save-every", 4,
               "--keep-checkpoints", "--no-progress")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERTS and config["target_modules"] == "all-linear"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]

    done = run("analyze", "--base", tmp_path / "model", "--checkpoints", tmp_path / "run" / "checkpoints" / "step-4",
               tmp_path / "run" / "checkpoints" / "step-8", "--modules", "gate_up_proj", "down_proj", "q_proj",
               "--out", tmp_path / "analysis")
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "analysis" / "analysis.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    stacks = [r for r in table if r["module"] in ("gate_up_proj", "down_proj")]
    assert len(stacks) == 2 * 2 * 2 * 4  # checkpoints x layers x stacks x experts
    assert {r["expert"] for r in stacks} == {"0", "1", "2", "3"}
    assert [r["expert"] for r in table if r["module"] == "q_proj"] == [""] * 4
    assert all(float(r["delta_m"]) > 0 and float(r["delta_d"]) > 0 for r in stacks)  # every expert moved
    # Golden: a merged DoRA row has norm m, so delta_m of expert 2 of layer 0's gate_up_proj is mean |m - ||W0||_row|.
    from safetensors.torch import load_file
    from transformers import Qwen3MoeForCausalLM

    base = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "model").model.layers[0].mlp.experts.gate_up_proj
    tensors = load_file(tmp_path / "run" / "checkpoints" / "step-8" / "adapter_model.safetensors")
    magnitude = tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_magnitude_vector"]
    expected = (magnitude[2].double() - base[2].double().norm(dim=1)).abs().mean().item()
    row = next(r for r in stacks if r["checkpoint"].endswith("step-8") and r["layer"] == "0"
               and r["module"] == "gate_up_proj" and r["expert"] == "2")
    assert float(row["delta_m"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_compare_on_a_moe_model(tmp_path):
    import json

    from .train_assets import colour_records, write_jsonl

    make_moe_dir(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", colour_records(120))
    done = run("compare", "--model", tmp_path / "model", "--data", tmp_path / "train.jsonl", "--methods", "full", "lora",
               "dora", "--ranks", 4, "--seeds", 0, "--max-steps", 6, "--batch-size", 8, "--lr", 1e-2, "--full-lr", 1e-3,
               "--output", tmp_path / "cmp")
    assert done.returncode == 0, done.stderr
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())["table"]
    assert [(r["method"], r["failed"]) for r in table] == [("full", 0), ("lora", 0), ("dora", 0)]
    trainable = {r["method"]: r["trainable_parameters"] for r in table}
    # Expert adapters: DoRA adds one magnitude per expert row over LoRA's A and B.
    assert trainable["lora"] < trainable["dora"] < trainable["full"]
    adapter = json.loads((tmp_path / "cmp" / "dora-r4-s0" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_parameters"] == EXPERTS


@pytest.mark.parametrize("to", ["peft", "diffusers", "kohya"])
def test_convert_refuses_parameter_adapters_and_writes_nothing(tmp_path, capsys, to):
    """`dorakit convert` reads per-module LoRA pairs; an adapter of expert stacks converted as one
    (found at the issue-17 merge) was written as target_modules on the experts module, which no
    loader can adapt, and to kohya with exit 0."""
    from dorakit.cli import main as cli_main

    model = dorakit.inject_adapters(build("qwen3_moe"), dorakit.DoraConfig(r=2, target_parameters=EXPERTS))
    dorakit.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / ("out.safetensors" if to == "kohya" else "out")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["convert", str(tmp_path / "adapter"), "--to", to, "--component", "unet", "--out", str(out)])
    assert exit_.value.code == 2
    assert "target_parameters" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("save", ["save_kohya", "save_diffusers"])
def test_community_formats_refuse_expert_adapters_and_write_nothing(tmp_path, save):
    """kohya and diffusers files hold per-module LoRA pairs only; the expert stacks were dropped from them
    without a word (found at the issue-17 merge), so the file loaded as another model."""
    model = dorakit.inject_adapters(build("qwen3_moe"), dorakit.DoraConfig(r=2, target_modules=["q_proj"],
                                                                           target_parameters=EXPERTS))
    out = tmp_path / "file"
    with pytest.raises(ValueError, match="target_parameters"):
        getattr(dorakit, save)(model, out, component="unet")
    assert not out.exists()
