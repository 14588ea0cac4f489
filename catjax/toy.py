"""The learning proof's model: a tiny decoder trained from scratch on the toy arithmetic task.

The task itself is `catjax/datasets/toy.py`. Here: its vocabulary (every number 0..99 is one
token; a Hugging Face `tokenizer.json` with a chat template, so the model directory loads like any
other, in catjax or in transformers), the model's architecture, and the supervised examples that
teach it both jobs CaT needs from one set of weights:

- as the *policy*, `Q:<question>A:` -> a worked solution drawn from the noisy process, so that
  rollouts sampled at temperature 1 make independent step errors;
- as the *anchor*, `S:<rollout>|<rollout>|...A:` (the round's question-blind synthesis prompt in
  its toy style) -> the correct solution, so the model learns to recover the question's numbers
  from several flawed rollouts and redo the arithmetic.

The prompts come from `catjax.cat.prompts` through the tokenizer's chat template, exactly as the
CaT round builds them. The trained model ships in `catjax/data_files/toy_model/` (reproduced by
`configs/toy_sft.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from catjax import text
from catjax.cat import prompts
from catjax.datasets import toy as toy_data
from catjax.models import ModelConfig, RopeConfig

SHIPPED_MODEL = Path(__file__).resolve().parent / "data_files" / "toy_model"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# Numbers, signed one-digit operands, and the few symbols of solutions and prompts.
VOCAB = (*SPECIALS, *(str(i) for i in range(100)), *(f"{s}{d}" for s in "+-" for d in range(1, 10)),
         "=", ",", " ", "\\boxed{", "}", "Q:", "S:", "A:", "|")
SPLIT_PATTERN = r"\\boxed\{|[+-][1-9]|\d{1,2}|[QSA]:|."
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}A:{% endif %}")


def model_config(**overrides) -> ModelConfig:
    """About 1.8M parameters by default (Llama layout, so the export loads in transformers)."""
    arch = dict(family="llama", vocab_size=len(VOCAB), hidden_size=192, num_layers=4, num_heads=6,
                num_kv_heads=2, head_dim=32, mlp_dim=512, norm_eps=1e-5,
                rope=RopeConfig(theta=10_000.0), tie_embeddings=True, max_position=512)
    return ModelConfig(**{**arch, **overrides})


def write_tokenizer(directory: str | os.PathLike[str]) -> None:
    """tokenizer.json + tokenizer_config.json for the toy vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(list(SPECIALS))
    os.makedirs(directory, exist_ok=True)
    tk.save(os.path.join(directory, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def load_tokenizer(directory: str | os.PathLike[str] | None = None) -> text.Tokenizer:
    """The toy tokenizer: from a model directory, or built afresh in a cache directory."""
    if directory is None:
        directory = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                 "catjax", "toy_tokenizer")
        if not os.path.exists(os.path.join(directory, "tokenizer_config.json")):
            write_tokenizer(directory)
    return text.load_tokenizer(directory)


# --- supervised examples -------------------------------------------------------------------

def policy_example(tok: text.Tokenizer, question: str, rng: np.random.Generator,
                   task: toy_data.ToyTask) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids): the question -> a noisy worked solution."""
    prompt = tok.chat(prompts.math_problem(question, "toy"), add_generation_prompt=True)
    target = tok.encode(toy_data.noisy_solution(question, rng, task)) + [tok.eos_ids[0]]
    return prompt, target


def synthesis_example(tok: text.Tokenizer, question: str, num_rollouts: int,
                      rng: np.random.Generator, task: toy_data.ToyTask) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids): noisy rollouts, question withheld -> the correct solution."""
    rollouts = [toy_data.noisy_solution(question, rng, task) for _ in range(num_rollouts)]
    prompt = tok.chat(prompts.synthesis(rollouts, "math", "toy"), add_generation_prompt=True)
    target = tok.encode(toy_data.solution(question)) + [tok.eos_ids[0]]
    return prompt, target


def pad_batch(pairs: list[tuple[list[int], list[int]]], length: int, pad_id: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens [B, length] and a loss mask over the target tokens [B, length - 1]
    (position t predicts token t + 1)."""
    tokens = np.full((len(pairs), length), pad_id, np.int32)
    mask = np.zeros((len(pairs), length - 1), np.float32)
    for i, (p, t) in enumerate(pairs):
        seq = (p + t)[:length]
        tokens[i, :len(seq)] = seq
        mask[i, len(p) - 1:len(seq) - 1] = 1.0
    return tokens, mask
