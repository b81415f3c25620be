"""The loop's arithmetic: the selective-head loss, accumulation, checkpointing, schedules, options."""

from __future__ import annotations

import json

import pytest
import torch

import dorakit
from dorakit.train import TrainConfig, run
from dorakit.train.batches import IGNORE
from dorakit.train.loss import causal_lm_loss_sum, selective_head
from dorakit.train.options import math_differences, read_config_file
from dorakit.train.schedule import lr_factor

from .conftest import rel_err, seeded, tiny_gpt2, tiny_llama
from .train_assets import colour_records, make_model_dir, write_jsonl

pytest.importorskip("transformers")


def _batch(vocab=96):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=gen)
    labels = ids.clone()
    labels[:, :7] = IGNORE  # a prompt
    labels[2, 10:] = IGNORE  # padding
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_selective_head_loss_equals_full_logits_with_gradients(builder):
    model = dorakit.inject_adapters(seeded(builder), dorakit.DoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=builder is tiny_gpt2))
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    assert selective_head(model)
    batch = _batch()
    grads = []
    for selective in (True, False):
        model.zero_grad()
        loss = causal_lm_loss_sum(model, batch, selective)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (a, ga), (b, gb) = grads
    assert rel_err(a, b) < 1e-6
    assert max(rel_err(x, y) for x, y in zip(ga, gb)) < 1e-5
    reference = torch.nn.functional.cross_entropy(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].flatten(0, 1),
        batch["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")
    assert rel_err(a, reference) < 1e-6


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    make_model_dir(root / "model")
    write_jsonl(root / "train.jsonl", colour_records(64))
    return root


def _losses(root, name, **options):
    cfg = TrainConfig(model=str(root / "model"), data=str(root / "train.jsonl"), output=str(root / name),
                      max_steps=4, batch_size=8, lr=1e-2, lora_dropout=0.0, val_fraction=0, progress=False, **options)
    run(cfg)
    return [json.loads(line)["loss"] for line in (root / name / "metrics.jsonl").read_text().splitlines()]


def test_a_new_classifier_head_is_seeded_by_the_run(tmp_path):
    """The head a classifier gets for the data's labels is initialised while loading: --seed must fix
    it, whatever the global RNG held before (unseeded, one command trained different models each time)."""
    from dorakit.train.model import load_for_training

    model_dir = make_model_dir(tmp_path / "clf", kind="classifier")  # a 2-class head; 3 labels give a new one
    cfg = TrainConfig(model=str(model_dir), data="unused", seed=3)
    heads = []
    for before in (0, 1):
        torch.manual_seed(before)
        model = load_for_training(cfg, model_dir, ["cold", "plain", "warm"]).model
        heads.append({k: v.clone() for k, v in model.state_dict().items() if "score" in k})
    assert heads[0] and heads[0].keys() == heads[1].keys()
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_accumulation_and_checkpointing_give_the_same_steps(tiny_run):
    whole = _losses(tiny_run, "whole")
    accumulated = _losses(tiny_run, "accumulated", micro_batch_size=2)
    checkpointed = _losses(tiny_run, "checkpointed", gradient_checkpointing=True)
    lora = _losses(tiny_run, "lora", method="lora")
    # Per-token normalisation over the global batch makes 4 micro-batches of 2 one batch of 8.
    assert max(abs(a - b) / a for a, b in zip(whole, accumulated)) < 1e-5
    assert max(abs(a - b) / a for a, b in zip(whole, checkpointed)) < 1e-5
    assert whole[0] == pytest.approx(lora[0], rel=1e-6)  # same start (B = 0), different method after
    assert whole[1:] != lora[1:]


def test_vera_and_dvora_train_and_reload(tiny_run):
    import dorakit
    from dorakit.train.inference import load_with_adapter

    whole = _losses(tiny_run, "whole-again")
    for method in ("vera", "dvora"):
        losses = _losses(tiny_run, method, method=method)
        assert losses[0] == pytest.approx(whole[0], rel=1e-6)  # lambda_b = 0: the base model at step 0
        assert losses[1:] != whole[1:]  # it trained (4 steps are too few to ask for a lower loss)
        config = dorakit.read_adapter_config(tiny_run / method / "adapter")
        assert config.method == method and config.r == 256 and config.save_projection
        model = load_with_adapter(str(tiny_run / "model"), str(tiny_run / method / "adapter"))[0]
        trainable = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "vera" in n or "magnitude" in n}
        assert all(bool(layer.vera_lambda_b.any()) for _, layer in dorakit.adapter_layers(model))
        assert trainable == ({"vera_lambda_b", "vera_lambda_d"} | ({"lora_magnitude_vector"} if method == "dvora" else set()))


def test_schedules():
    linear = [lr_factor(k, warmup=10, total=100, kind="linear") for k in range(1, 101)]
    assert linear[9] == 1.0 and linear[10] == 1.0 and 0 < linear[-1] < 0.02
    cosine = [lr_factor(k, warmup=0, total=100, kind="cosine") for k in range(1, 101)]
    assert cosine[0] == 1.0 and all(a >= b for a, b in zip(cosine, cosine[1:])) and cosine[-1] > 0
    assert lr_factor(50, warmup=10, total=100, kind="constant") == 1.0
    with pytest.raises(ValueError, match="Unknown schedule"):
        lr_factor(50, warmup=10, total=100, kind="step")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 10, "micro_batch_size": 4}, "not a multiple of --micro-batch-size 4"),
        ({"lr": 0}, "--lr must be a positive number"),
        ({"val_fraction": 1.0}, "--val-fraction must be in"),
        ({"prompt_template": "no placeholder"}, "must contain {text}"),
        ({"max_steps": 0}, "--max-steps must be at least 1"),
    ],
)
def test_bad_options_are_refused_with_the_flag_name(options, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        TrainConfig(**options)


def test_config_file_shapes(tmp_path):
    (tmp_path / "one.yaml").write_text("r: 4\nmax-steps: 3\n", encoding="utf-8")
    assert read_config_file(tmp_path / "one.yaml", None) == {"r": 4, "max_steps": 3}
    (tmp_path / "list.yaml").write_text("- 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must hold a mapping"):
        read_config_file(tmp_path / "list.yaml", None)
    with pytest.raises(ValueError, match="holds a single configuration"):
        read_config_file(tmp_path / "one.yaml", "fast")
    (tmp_path / "bad.yaml").write_text("r: [1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="could not be parsed"):
        read_config_file(tmp_path / "bad.yaml", None)
    with pytest.raises(FileNotFoundError):
        read_config_file(tmp_path / "missing.yaml", None)
    (tmp_path / "finlora.yaml").write_text("quant_bits: 4\nquant_type: fp4\n", encoding="utf-8")
    options = read_config_file(tmp_path / "finlora.yaml", None)
    assert options == {"quantize": "4bit", "quant_type": "fp4"}
    assert TrainConfig(**options).quantization.bits == 4
    (tmp_path / "bits.yaml").write_text("quant_bits: 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="quant_bits .* must be 4 or 8"):
        read_config_file(tmp_path / "bits.yaml", None)


def test_resume_may_change_only_what_does_not_change_the_numbers():
    saved = TrainConfig(model="m", data="d")
    assert math_differences(saved, TrainConfig(model="m", data="d", eval_every=5, save_every=7, resume=True)) == []
    assert math_differences(saved, TrainConfig(model="m", data="d", seed=1)) == ["--seed: 0 in the saved run, 1 now"]


def test_gradient_checkpointing_is_really_on(tiny_run):
    from dorakit.train.model import load_for_training

    cfg = TrainConfig(model=str(tiny_run / "model"), data="x", gradient_checkpointing=True)
    loaded = load_for_training(cfg, cfg.model, [])
    assert loaded.model.model.gradient_checkpointing  # the decoder recomputes its layers in backward
    assert not load_for_training(TrainConfig(model=cfg.model, data="x"), cfg.model, []).model.model.gradient_checkpointing


def test_the_example_config_file_is_valid():
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "sentiment.yaml"
    for name in ("smollm2_dora_r8", "smollm2_dora_r4", "smollm2_lora_r8"):
        cfg = TrainConfig(**read_config_file(path, name))
        assert cfg.output == f"runs/{name}" and cfg.data is None


def test_answer_extraction_takes_the_earliest_whole_word_label():
    from dorakit.train.evaluate import extract_answer

    labels = ["negative", "neutral", "positive"]
    assert extract_answer(" Positive. Not negative.", labels) == "positive"
    assert extract_answer("it is NEUTRAL", labels) == "neutral"
    assert extract_answer("nonpositive", labels) is None  # a label inside another word does not count
    assert extract_answer("", labels) is None
