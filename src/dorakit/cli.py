"""The ``dorakit`` command line: ``dorakit <subcommand> --help`` documents every option with its default.

    dorakit train [--config FILE [--name NAME]] [--model DIR] [--data FILE] [--output DIR] [--resume] ...
    dorakit eval --adapter DIR [--model DIR] [--data FILE]
    dorakit generate --prompt TEXT [--adapter DIR] [--model DIR]
    dorakit merge --base DIR --adapter DIR --out DIR
    dorakit convert SRC --to peft|diffusers|kohya --out DST [--base DIR] [--approximate]

Subcommands are typed functions (and ``TrainConfig``, a dataclass); tyro builds the parsers from their
signatures and docstrings. ``train`` layers its defaults: TrainConfig's < the embedded default's (when
no --data is given) < a --config file < the saved config of a --resume'd run < the command line.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

from tyro.conf import Positional, arg

from .integrations.transformers import DTypeName
from .integrations.bitsandbytes import QuantizeName, QuantType
from .train.inference import AccuracyMode
from .train.options import TrainConfig
from .usage import above_zero, at_least, explain, not_empty, usable_directory

def merge(adapter: str, out: str, base: str | None = None, dtype: DTypeName = "auto", overwrite: bool = False,
          quantize: QuantizeName = "none", quant_type: QuantType = "nf4", double_quant: bool = True,
          requantize: str | None = None) -> None:
    """Fold an adapter into its base model and write a plain transformers checkpoint.

    The output loads with transformers alone; it also holds the adapter and the row norms that let
    dorakit.load_merged undo the merge exactly later. An adapter trained over a quantized base
    (--quantize) is merged into the dequantized weights it was trained against, and the checkpoint
    is full precision; the error of storing it back in the same format is measured and printed.

    Args:
        adapter: Adapter directory (written by dorakit or by PEFT, LoRA or DoRA).
        out: Output directory for the merged checkpoint (written whole, then renamed into place).
        base: Base model: a transformers checkpoint directory. Unset: the one the adapter records.
        dtype: Dtype to load the base model in; "auto" keeps the checkpoint's.
        overwrite: Replace a non-empty output directory.
        quantize: The quantization the adapter was trained over (as `dorakit train --quantize`).
        quant_type: 4-bit data type used in training.
        double_quant: Whether training used 4-bit double quantization.
        requantize: With --quantize: also write the merged model re-quantized to this directory.
    """
    from .integrations.transformers import load_pretrained, load_tokenizer
    from .inject import adapter_layers
    from .formats.peft import load_adapter
    from .formats.merged import save_merged
    from .integrations.bitsandbytes import Quantization, save_merged_dequantized

    quantization = Quantization.parse(quantize, quant_type, double_quant)
    if requantize is not None and quantization is None:
        raise ValueError("--requantize re-quantizes the merge of an adapter trained over a quantized base; add --quantize.")
    start = time.perf_counter()
    base = _base_model(base, adapter, flag="--base")
    model = load_pretrained(base, dtype, quantization)
    load_adapter(model, adapter)
    layers = len(adapter_layers(model))
    if quantization is None:
        save_merged(model, out, tokenizer=load_tokenizer(base), overwrite=overwrite)
    else:
        report = save_merged_dequantized(model, out, tokenizer=load_tokenizer(base), overwrite=overwrite,
                                         requantize=quantization, requantized_directory=requantize)
        error = report["requantization"]
        print(f"merged into the dequantized {quantize} weights, written in {report['dtype']}; storing the merge back in "
              f"{error['format']} would change the merged weights by {100 * error['relative_error']:.2f}% (relative "
              f"Frobenius error; worst layer {error['worst_layer']}: {100 * error['worst_relative_error']:.2f}%)")
        if requantize is not None:
            print(f"re-quantized copy: {requantize}")
    print(f"merged {layers} adapted layers of {base} with {adapter} into {out} in {time.perf_counter() - start:.1f} s")


def convert(src: Positional[Annotated[str, arg(metavar="SRC")]], to: Literal["peft", "diffusers", "kohya"], out: str,
            base: str | None = None, approximate: bool = False, component: str | None = None,
            overwrite: bool = False) -> None:
    """Convert an adapter between PEFT, diffusers and kohya/LyCORIS files, exactly or not at all.

    Reads a PEFT directory, a diffusers LoRA directory or file, or a kohya/LyCORIS file (told apart by its
    keys) and writes the same adapter in the other layout: module keys, alpha vs lora_alpha, DoRA's
    magnitude shape and axis, conv shapes and text-encoder prefixes. A conversion no file of the target
    layout can represent (an input-axis magnitude to PEFT or diffusers) is refused with the reason.

    Args:
        src: The adapter: a PEFT directory, a diffusers directory/file, or a kohya .safetensors file.
        to: The layout to write.
        out: A directory (peft, diffusers) or a .safetensors file (kohya).
        base: The base model directory (a diffusers pipeline or model, or a transformers model): exact
            module names for kohya files, and the base weights --approximate needs.
        approximate: Fit an input-axis adapter to the output axis (same rank) and report the error.
        component: The pipeline component of a single-model adapter: unet, transformer, text_encoder, ...
        overwrite: Replace an existing output.
    """
    from .formats.convert import convert as run_convert

    done = run_convert(src, to, out, base=base, approximate=approximate, component=component, overwrite=overwrite)
    parts = ", ".join(f"{count} {name or 'model'}" for name, count in done.layers.items())
    print(f"converted {done.source_layout} {src} ({parts} layers) to {to}: {', '.join(map(str, done.written))}")
    if done.approximation:
        worst = max(done.approximation, key=done.approximation.get)
        mean = sum(done.approximation.values()) / len(done.approximation)
        print(f"approximated {len(done.approximation)} input-axis layers by output-axis DoRA of the same rank: weight "
              f"error ||W_fit - W'|| / ||W' - W0|| mean {mean:.3g}, worst {done.approximation[worst]:.3g} "
              f"({worst[0] + '.' if worst[0] else ''}{worst[1]})")


def evaluate(adapter: str | None = None, model: str | None = None, data: str | None = None,
             accuracy: AccuracyMode = "rank", max_examples: int | None = None, batch_size: int = 16,
             max_length: int | None = None, prompt_template: str | None = None, field_map: dict[str, str] | None = None,
             dtype: DTypeName = "auto", max_new_tokens: int | None = None, out: str | None = None,
             quantize: QuantizeName = "none", quant_type: QuantType = "nf4", double_quant: bool = True) -> None:
    """Evaluate a model (with an adapter) on a data file: loss, perplexity and label accuracy.

    An adapter trained by dorakit carries a run record (dorakit_run.json): unset options below are the
    run's, and label accuracy ranks the labels it trained. How the data was read, and any difference
    from the run, is printed first (to stderr; the metrics go to stdout as JSON).

    Args:
        adapter: Adapter directory (dorakit's or PEFT's). Unset: the base model alone.
        model: Base model directory. Unset: the adapter's recorded base (an error if it is not here); without
            --adapter, the embedded SmolLM2.
        data: Data file (the shapes `dorakit train` reads). Unset: the embedded tweet-sentiment test split.
        accuracy: For label-style data (text/label, or few short recurring targets in any shape): rank the
            candidate labels by likelihood, parse a greedy answer, both, or none.
        max_examples: Evaluate the first N examples only.
        batch_size: Examples per forward pass.
        max_length: Truncate examples to this many tokens. Unset: the run's, else 512.
        prompt_template: Prompt for text/label data with {text}. Unset: the run's.
        field_map: Rename data fields, e.g. --field-map sentiment label. Unset: the run's.
        dtype: Dtype to load the base model in.
        max_new_tokens: Tokens to generate per answer (accuracy generate/both). Unset: the longest target + 2.
        out: Also write the metrics to this JSON file.
        quantize: Load the base quantized, as the adapter was trained (`dorakit train --quantize`).
        quant_type: 4-bit data type used in training.
        double_quant: Whether training used 4-bit double quantization.
    """
    from .integrations.bitsandbytes import Quantization
    from .train.inference import evaluate_file

    at_least(1, max_examples=max_examples, batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens)
    default_template = None
    if data is None:
        from .demo import PROMPT, tweet_sentiment

        data, default_template = str(tweet_sentiment() / "test.jsonl"), PROMPT
    result = evaluate_file(_base_model(model, adapter), data, adapter, accuracy=accuracy, max_examples=max_examples,
                           batch_size=batch_size, max_length=max_length, prompt_template=prompt_template,
                           field_map=field_map, dtype=dtype, max_new_tokens=max_new_tokens,
                           quantization=Quantization.parse(quantize, quant_type, double_quant),
                           default_template=default_template)
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        from . import atomic

        atomic.write_text(out, text)


def generate(prompt: str, adapter: str | None = None, model: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, chat: str = "auto", seed: int = 0, dtype: DTypeName = "auto",
             quantize: QuantizeName = "none", quant_type: QuantType = "nf4", double_quant: bool = True) -> None:
    """Generate a continuation of a prompt with a model and adapter.

    Args:
        prompt: The text to continue (sent as a user turn when the chat template is used).
        adapter: Adapter directory. Unset: the base model alone.
        model: Base model directory. Unset: the adapter's recorded base (an error if it is not here); without
            --adapter, the embedded SmolLM2.
        max_new_tokens: Tokens to generate at most.
        temperature: 0 for greedy decoding; above 0 samples.
        chat: auto uses the tokenizer's chat template when it has one; on requires it; off sends raw text.
        seed: Seed for sampling.
        dtype: Dtype to load the base model in.
        quantize: Load the base quantized, as the adapter was trained (`dorakit train --quantize`).
        quant_type: 4-bit data type used in training.
        double_quant: Whether training used 4-bit double quantization.
    """
    from .integrations.bitsandbytes import Quantization
    from .train.inference import generate as run_generate

    if chat not in ("auto", "on", "off"):
        raise ValueError(f"--chat must be auto, on or off, got {chat!r}.")
    at_least(1, max_new_tokens=max_new_tokens)
    at_least(0, temperature=temperature)
    print(run_generate(_base_model(model, adapter), prompt, adapter, max_new_tokens=max_new_tokens,
                       temperature=temperature, chat=chat, seed=seed, dtype=dtype,
                       quantization=Quantization.parse(quantize, quant_type, double_quant)))


def analyze(base: str, checkpoints: list[str], out: str, modules: list[str] = ["q_proj", "v_proj"]) -> None:
    """Magnitude and direction change of fine-tuned weights against the base (the DoRA paper's Fig. 2).

    Writes OUT/analysis.csv (checkpoint, method, step, layer, module, name, delta_m, delta_d, expert: one
    row per weight matrix, or per expert of a stack, per checkpoint), OUT/analysis.json (correlation of
    delta_d with delta_m per method and module) and OUT/analysis.png (the scatter per method with a fitted line).

    Args:
        base: The pre-trained model directory the checkpoints started from.
        checkpoints: Adapter directories (LoRA or DoRA; merged on the fly), dorakit checkpoint
            directories, or full fine-tuned model directories.
        out: Output directory.
        modules: Module names whose weights are analysed (the paper: query and value projections;
            BERT-style models call them query and value). Expert stacks of a mixture-of-experts model
            are named by parameter (gate_up_proj, down_proj) and analysed expert by expert.
    """
    from .analysis.decomposition import analyse
    from .analysis.report import write_report
    from .integrations.transformers import check_checkpoint_dir

    usable_directory(out, "--out")
    not_empty(checkpoints=checkpoints, modules=modules)
    check_checkpoint_dir(base, "Base model")
    rows = analyse(base, checkpoints, modules)
    summary = write_report(rows, Path(out))
    for method, groups in summary.items():
        for module, stats in groups.items():
            r = stats["correlation"]
            print(f"{method:>5} {module:>8}: {stats['points']:4d} weights, corr(ΔD, ΔM) = "
                  f"{'n/a' if r is None else f'{r:+.2f}'}, mean ΔD {stats['mean_delta_d']:.3g}, mean ΔM {stats['mean_delta_m']:.3g}")
    print(f"wrote {out}/analysis.csv, analysis.json, analysis.png")


def compare(output: str, model: str | None = None, data: str | None = None,
            methods: list[str] = ["full", "lora", "dora", "dora-half"], ranks: list[int] = [8],
            seeds: list[int] = [0, 1, 2], max_steps: int | None = None, batch_size: int | None = None,
            lr: float | None = None, full_lr: float | None = None, vera_ranks: list[int] = [256],
            vera_lr: float | None = None, config: str | None = None, name: str | None = None) -> None:
    """Compare full fine-tuning, LoRA, DoRA, DoRA at half rank, VeRA and DVoRA on one model, data set and budget.

    Every run is `dorakit train` with the same options but method, rank (lora_alpha = 2 x rank) and
    seed, in OUTPUT/<method>-r<rank>-s<seed>/ (finished runs are reused when the command is repeated).
    Prints and writes OUTPUT/compare.csv and compare.json (accuracy mean ± std over seeds, final
    training loss, validation loss, trainable parameters, seconds per step, peak memory) and
    OUTPUT/compare.png.

    Args:
        output: Directory for the runs and the table.
        model: Model directory. Unset: the embedded SmolLM2.
        data: Training data (text/label data gives accuracy). Unset: the embedded tweet-sentiment set.
        methods: Any of full, lora, dora, dora-half, vera, dvora.
        ranks: Adapter ranks of lora and dora (dora-half uses half of each).
        seeds: Seeds; each method and rank runs once per seed.
        max_steps: Optimizer steps per run (the shared budget).
        batch_size: Global batch per step.
        lr: Learning rate of the adapter runs.
        full_lr: Learning rate of full fine-tuning (typically 10-100x lower than an adapter's).
        vera_ranks: Ranks of vera and dvora (their shared projections; trainable size is r + out per layer).
        vera_lr: Learning rate of vera and dvora (VeRA's authors use about 10x LoRA's). Unset: --lr.
        config: A `dorakit train` config file with the other options (every run uses it).
        name: Named configuration in --config.
    """
    from .analysis.compare import format_table, plan, run_all, table, write

    # Every run is a `dorakit train` subprocess: check what they all share first, not once per failed run.
    usable_directory(output, "--output")
    not_empty(methods=methods, ranks=ranks, seeds=seeds)
    at_least(1, *ranks, *vera_ranks, max_steps=max_steps, batch_size=batch_size)
    above_zero(lr=lr, full_lr=full_lr, vera_lr=vera_lr)
    if model is not None:
        from .integrations.transformers import check_checkpoint_dir

        check_checkpoint_dir(model)
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"Data file {data} " + ("is not a file." if Path(data).exists() else "does not exist."))
    if config is not None:
        from .train.options import read_config_file

        read_config_file(config, name)
    common: list[str] = []
    if data is None:
        from .demo import DEMO_OPTIONS, tweet_sentiment

        data = str(tweet_sentiment() / "train.jsonl")
        if config is None:  # the embedded default's options; a --config file replaces them
            for key in ("prompt_template", "batch_size", "max_steps", "lr", "lora_dropout", "warmup_steps",
                        "max_length", "val_fraction", "max_val_examples"):
                common += [f"--{key.replace('_', '-')}", str(DEMO_OPTIONS[key])]
    common += ["--data", data, "--eval-every", "0", "--save-every", "0"]
    for flag, value in (("--model", model), ("--max-steps", max_steps), ("--batch-size", batch_size),
                        ("--lr", lr), ("--config", config), ("--name", name)):
        if value is not None:
            common += [flag, str(value)]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    records = run_all(plan(methods, ranks, seeds, vera_ranks), common, full_lr, out, vera_lr)
    rows = table(records)
    write(records, rows, out)
    print(format_table(rows))
    print(f"wrote {out}/compare.csv, compare.json, compare.png")
    failed = [r for r in records if "error" in r]
    if failed:  # a table with holes is not a finished comparison: exit 1, like a failed run
        from .train.loop import TrainingError

        raise TrainingError(f"{len(failed)} of {len(records)} runs failed (first: {failed[0]['run']}: "
                            f"{failed[0]['error']}). Fix the cause and repeat the command: finished runs are reused.")


def _base_model(model: str | None, adapter: str | None, flag: str = "--model") -> str:
    """The base model to load: the one given, else the adapter's recorded one, else (no adapter) the
    embedded SmolLM2. Never another model than the adapter's (issue 19): a missing one is an error."""
    if model is not None:
        return model
    if adapter is None:
        from .assets import smollm2_path

        return str(smollm2_path())
    from .formats.peft import CONFIG_NAME, recorded_base
    from .formats.peft_config import hub_name

    recorded, hub = recorded_base(adapter)
    hub = hub or hub_name(recorded)
    if recorded and Path(recorded).is_dir():
        return recorded
    where = f"{Path(adapter) / CONFIG_NAME}"
    if not recorded:
        raise ValueError(f"The adapter {adapter} records no base model ({where} has no base_model_name_or_path); "
                         f"pass the model it was trained on with {flag} DIR.")
    named = f" ({hub} on the model hub)" if hub and hub != recorded else ""
    raise FileNotFoundError(f"The adapter {adapter} was trained on {recorded}{named}, which is not a directory here "
                            f"(recorded in {where}). Pass that model with {flag} DIR (a local transformers checkpoint).")


def train_config(argv: list[str]) -> TrainConfig:
    """The TrainConfig for ``dorakit train ARGV`` with its layered defaults (see the module docstring)."""
    import tyro

    from .train.output import resumable_state
    from .train.options import read_config_file

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--config", "--name", "--output", "--data"):
        pre.add_argument(flag)
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(argv)
    defaults: dict = {}
    if known.config:
        defaults = read_config_file(known.config, known.name)
    elif known.name:
        raise ValueError("--name chooses a configuration of a --config file; give the file too.")
    helping = "-h" in argv or "--help" in argv  # help lists what a run with --data gets (issue 14)
    if known.data is None and defaults.get("data") is None and not helping:
        from .demo import DEMO_OPTIONS

        defaults = {**DEMO_OPTIONS, **defaults}
    if known.resume:
        output = known.output or defaults.get("output") or TrainConfig.output
        saved = resumable_state(Path(output))["config"]
        saved.pop("strategy", None)  # how this launch runs (torchrun or not) is for this command line to say
        defaults = {**defaults, **saved}
    base = TrainConfig(**defaults)
    return tyro.cli(TrainConfig, args=argv, default=base, prog="dorakit train",
                    description=train_description() if helping else None)


def train_description() -> str:
    """``dorakit train --help``'s text: the options' defaults are a run with --data's; this says what
    the embedded demo (no --data) changes."""
    from .demo import DEMO_OPTIONS

    defaults = TrainConfig()
    changed = [f"--{key.replace('_', '-')} " + ("(its tweet-sentiment prompt)" if key == "prompt_template" else str(value))
               for key, value in DEMO_OPTIONS.items() if getattr(defaults, key) != value]
    return (f"{TrainConfig.__doc__.strip()} The defaults below are those of a run with --data. Without --data, `dorakit "
            f"train` runs the embedded demo (SmolLM2-135M-Instruct learns tweet sentiment), which changes these: "
            f"{', '.join(changed)}.")


def train(argv: list[str]) -> int:
    from .train.loop import TrainingError

    cfg = train_config(argv)
    demo = cfg.data is None  # the demo prints its own closing lines
    try:
        if cfg.data is None:
            from .demo import run_default

            summary = run_default(cfg)
        else:
            from .train.loop import run

            summary = run(cfg)
    except TrainingError as err:
        print(f"dorakit train: error: {err}", file=sys.stderr)
        return 1
    status = summary["status"]
    if status == "finished" and not demo and "config" in summary:  # rank 0's summary: the one process that prints
        from .train.report import closing_line

        print(closing_line(summary), flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        if sig.name in status:
            return 128 + sig.value  # the shell convention for "stopped by this signal"
    return 0


COMMANDS = {"train": TrainConfig, "eval": evaluate, "generate": generate, "merge": merge, "analyze": analyze,
            "compare": compare, "convert": convert}


def main(argv: list[str] | None = None) -> None:
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "train":
            raise SystemExit(train(argv[1:]))
        tyro.extras.subcommand_cli_from_dict(COMMANDS, args=argv, prog="dorakit")
    except (Exception, KeyboardInterrupt) as err:
        explained = explain(err)
        if explained is None:
            raise
        code, message = explained
        message = " ".join(line.strip() for line in message.strip().splitlines())  # one line, whoever wrote it
        print(f"dorakit: error: {message}" if code != 130 else "dorakit: interrupted", file=sys.stderr)
        raise SystemExit(code) from None


if __name__ == "__main__":
    main()
