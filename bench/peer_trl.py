"""Peer benchmark worker: one GRPO iteration of Hugging Face TRL's `GRPOTrainer` on CPU.

One iteration is what `workload.RL` describes: 4 prompts x 8 sampled completions (32 rows) of
exactly `--new-tokens` tokens each (EOS is suppressed until the budget is reached), the shared
exact-match reward on every completion, and one AdamW update (beta 0, so no reference model)
over all 32 rows.

How it is timed: the trainer runs 1 + R optimizer steps over the 4 questions repeated 1 + R
times, in order. In TRL 1.16 the rollout (generation + reward + advantages) happens inside
`training_step` -> `_prepare_inputs`, which the Trainer calls between the `on_step_begin` and
`on_step_end` callbacks, so a callback timing that span sees generation, reward, loss, backward
and the optimizer step. The first step is reported apart (warm-up). Generation alone is timed
by wrapping the trainer's `_generate_single_turn` (the `model.generate` call and EOS masking),
which also records the completion lengths.

Caveats of TRL's own path, kept as it is: on CPU its fused LM head scores every position
(prompt and padding too, masked afterwards; only CUDA/XPU score just the completion tokens),
its backward recomputes the head projection, and it also computes per-token entropy. With
beta 0 and one update per generation, it makes no extra pass for old log-probs. The chat-
templated prompts (SmolLM2 system prompt included) are up to 69 tokens; TRL 1.16 has no
option to cut them to RL's 64.

Usage: .venv-peers/bin/python bench/peer_trl.py --task rl --model DIR --new-tokens N [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
import workload  # noqa: E402


def completion_text(completion: Any) -> str:
    """A completion as text: conversational prompts give a list of assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


def exact_match_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """TRL reward-function signature around the shared `workload.reward`."""
    pairs = zip(completions, answer, strict=True)
    return [workload.reward(completion_text(c), a) for c, a in pairs]


class StepTimer(transformers.TrainerCallback):
    """Wall time of every optimizer step, from `on_step_begin` to `on_step_end`."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.times.append(time.perf_counter() - self._start)


class GenerationTimer:
    """Wraps a trainer's `_generate_single_turn` to time it and record completion lengths."""

    def __init__(self, trainer: trl.GRPOTrainer) -> None:
        self.times: list[float] = []
        self.lengths: list[list[int]] = []
        self._inner = trainer._generate_single_turn
        trainer._generate_single_turn = self  # instance attribute shadows the method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        completion_ids, logprobs = self._inner(*args, **kwargs)
        self.times.append(time.perf_counter() - start)
        self.lengths.append([len(ids) for ids in completion_ids])
        return completion_ids, logprobs


def prompt_tokens(tokenizer: Any, question: str) -> int:
    """Length of a chat-templated prompt, as the trainer tokenizes it."""
    ids = tokenizer.apply_chat_template(workload.messages(question), add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return len(ids)


def build_trainer(model_dir: str, new_tokens: int, steps: int, output_dir: str) -> trl.GRPOTrainer:
    rl = workload.RL
    rows = rl["num_prompts"] * rl["num_samples"]
    questions = workload.QUESTIONS[:rl["num_prompts"]]
    dataset = datasets.Dataset.from_list(
        [{"prompt": workload.messages(q), "answer": a} for q, a in questions] * steps)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    config = trl.GRPOConfig(
        output_dir=output_dir,
        seed=0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # TRL defaults to True
        # one step = 4 prompts x 8 samples, one update per generation batch
        num_generations=rl["num_samples"],
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_steps=steps,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        # sampling: plain multinomial at T=1, exactly `new_tokens` tokens per completion
        max_completion_length=new_tokens,
        temperature=rl["temperature"],
        top_p=rl["top_p"],
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        generation_kwargs={"min_new_tokens": new_tokens},
        use_vllm=False,
        # objective and optimizer
        beta=0.0,
        epsilon=rl["epsilon"],
        learning_rate=rl["lr"],
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        # no logging, saving or evaluation
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        log_completions=False,
        disable_tqdm=True,
    )
    return trl.GRPOTrainer(
        model=model,
        reward_funcs=exact_match_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def run_rl(model_dir: str, new_tokens: int, repeats: int) -> dict[str, Any]:
    steps = 1 + repeats
    with tempfile.TemporaryDirectory(prefix="peer_trl_") as output_dir:
        trainer = build_trainer(model_dir, new_tokens, steps, output_dir)
        step_timer = StepTimer()
        trainer.add_callback(step_timer)
        generation_timer = GenerationTimer(trainer)
        trainer.train()

    assert len(step_timer.times) == steps, step_timer.times
    assert len(generation_timer.times) == steps, generation_timer.times
    rows = workload.RL["num_prompts"] * workload.RL["num_samples"]
    questions = workload.QUESTIONS[:workload.RL["num_prompts"]]
    tokenizer = trainer.processing_class
    lengths = [n for step in generation_timer.lengths for n in step]
    assert len(lengths) == steps * rows, len(lengths)
    assert all(n == new_tokens for n in lengths), sorted(set(lengths))

    times = step_timer.times[1:]
    generation = generation_timer.times[1:]
    return {
        "library": "trl",
        "version": trl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "task": "rl",
        "model": os.path.basename(os.path.normpath(model_dir)),
        "rows": rows,
        "new_tokens": new_tokens,
        "times_s": times,
        "first_s": step_timer.times[0],
        **workload.summary(times),
        "generation_fraction": sum(generation) / sum(times),
        "peak_rss_mb": workload.peak_rss_mb(),
        "mean_completion_tokens": sum(lengths) / len(lengths),
        # TRL 1.16 has no prompt-length option: prompts go in whole, even past RL's 64-token cap.
        "longest_prompt_tokens": max(prompt_tokens(tokenizer, q) for q, _ in questions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["rl"], default="rl")
    parser.add_argument("--model", required=True, help="model directory (safetensors + tokenizer)")
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workload.emit(run_rl(args.model, args.new_tokens, args.repeats))


if __name__ == "__main__":
    main()
