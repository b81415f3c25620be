"""Tiny model directories (weights + a word-level tokenizer) and data files for training tests.

Everything is built in the test from configs: no download. The synthetic task is learnable by a tiny
model in a few dozen steps: the label is the colour word the text contains.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

COLOURS = {"red": "warm", "orange": "warm", "blue": "cold", "green": "cold", "grey": "plain", "white": "plain"}
FILLER = "the a one this that big small old new day night sky sea tree road".split()
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TEMPLATE_WORDS = ("Text Label Tweet Sentiment Below is an instruction that describes task paired with input "
                  "provides further context Write response appropriately completes request Instruction Input "
                  "Response ### : . , ? ! \\n question answer").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def colour_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        colour = rng.choice(list(COLOURS))
        words = rng.sample(FILLER, 3) + [colour]
        rng.shuffle(words)
        records.append({"text": " ".join(words), "label": COLOURS[colour]})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_tokenizer(extra_words: list[str] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + sorted(set(list(COLOURS) + list(COLOURS.values()) + FILLER + TEMPLATE_WORDS + list(extra_words)))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.add_special_tokens(SPECIALS[1:])  # matched whole, before the punctuation split
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model_dir(path: Path, kind: str = "causal", seed: int = 0, extra_words: list[str] = ()) -> Path:
    """A tiny LLaMA (causal LM or sequence classifier) with its tokenizer, saved as a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = make_tokenizer(extra_words)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                      tie_word_embeddings=False, initializer_range=0.3, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = (LlamaForSequenceClassification if kind == "classifier" else LlamaForCausalLM)(cfg)
    # Every weight set here from one seeded generator, whatever transformers' init does or other tests left.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * cfg.initializer_range)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
