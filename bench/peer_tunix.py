"""Peer benchmark worker: Google Tunix (JAX) on the shared workload, on the CPU.

    .venv-peers/bin/python bench/peer_tunix.py --task sampler|rl --model DIR --new-tokens N \
        [--repeats R] [--temperature T] [--top-p P]

Both tasks load the shared safetensors directory with Tunix's own loader
(`tunix.models.{qwen3,llama3}.params.create_model_from_safe_tensors`) into float32 parameters
on a one-device ("fsdp", "tp") mesh, with a `ModelConfig` built from the directory's
config.json. The last stdout line is one JSON object (`workload.emit`).

`sampler`: Tunix's vanilla `tunix.generate.sampler.Sampler` decodes the 4 chat-templated
questions x `workload.NUM_SAMPLES` (32 rows) in one call, nucleus sampling at T / top-p with no
top-k. No row stops early: the EOS set is {-1}, a token id that cannot be sampled, so every row
gets exactly N tokens (checked). Prompts are left-padded to the longest one and the KV cache
holds exactly that padded prompt plus N. One timed call is the whole `Sampler.__call__`
(prefill, the decode `while_loop`, the host copy of the tokens and Tunix's detokenisation);
`workload.timed` runs one warm-up call (compilation) before the `repeats` timed ones.

`rl`: one GRPO iteration of `tunix.rl.grpo.grpo_learner.GRPOLearner` on an `RLCluster` whose
actor and rollout share one mesh, hence one copy of the weights (no weight sync), with the
vanilla rollout engine: 4 questions x G=8 (32 rows) of exactly N tokens at T=1, top-p 1, the
shared exact-match reward, beta 0 (no reference model is built, so no reference pass), epsilon
0.2, one AdamW update (optax, lr 1e-6) over all 32 rows. Prompts are left-padded to
max(`max_prompt_tokens`, longest prompt) tokens: Tunix never truncates, and the longest
chat-templated question is 69 tokens, over the shared 64. The learner trains on 1 + R identical
batches; the dataset is a generator that stamps the clock each time the learner asks it for a
batch. Tunix asks for batch k+1 only after step k's update, metric buffering and step
bookkeeping are done, so consecutive stamps bracket one full iteration (generate + reward +
advantages + update). `max_steps` is set one past the data so the loop ends by asking for a
batch that is not there, which stamps the end of the last iteration. The first iteration
(compilation of the sampler and the train step) is reported apart as `first_s`. Generation
alone is timed by wrapping the cluster's `generate` on the instance (which returns host tokens,
so it has finished when it returns); it also records the completion lengths.

Tunix quirks, left as they are (we measure Tunix): its Qwen 3 and Llama 3 attention call
`apply_rope` without the configured base, so RoPE always uses 1e6 ("rope_theta_ignored"; the
tiny Qwen 3 was built with 1e6, SmolLM2 uses 1e5: numerics differ, timing does not). Its
top-p sorts the whole vocabulary every step (`jax.lax.top_k` with k = vocab) unless top_p is 1.
Its prefill computes logits at every prompt position, and for N new tokens it runs N decode
steps after the prefill (the last step's token falls off the end of the buffer), one more than
it keeps.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import transformers  # noqa: E402
import workload  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.generate import base_sampler  # noqa: E402
from tunix.generate import sampler as sampler_lib  # noqa: E402
from tunix.models.llama3 import model as llama3_model  # noqa: E402
from tunix.models.llama3 import params as llama3_params  # noqa: E402
from tunix.models.qwen3 import model as qwen3_model  # noqa: E402
from tunix.models.qwen3 import params as qwen3_params  # noqa: E402
from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl.grpo import grpo_learner  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402
from tunix.utils import mesh as mesh_lib  # noqa: E402

# A token id no sampler can produce: with it as the only EOS, every row runs the full budget.
NEVER_EOS = -1
# Tunix's RoPE base in both model classes, whatever the config says.
TUNIX_ROPE_THETA = 1_000_000


# --- model and tokenizer ---------------------------------------------------------------------

def read_config(model_dir: str) -> dict[str, Any]:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def rope_theta(hf: dict[str, Any]) -> float:
    return float(hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"])


def load_model(model_dir: str, mesh: jax.sharding.Mesh) -> tuple[nnx.Module, dict[str, Any]]:
    """The model from safetensors via Tunix's loader; returns it and facts for the report."""
    hf = read_config(model_dir)
    kind = hf["model_type"]
    dims = dict(num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
                embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
                num_heads=hf["num_attention_heads"],
                head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                num_kv_heads=hf["num_key_value_heads"], norm_eps=hf["rms_norm_eps"],
                rope_theta=int(rope_theta(hf)))  # stored in the config, unused by Tunix
    if kind == "qwen3":
        config = qwen3_model.ModelConfig(**dims, use_tied_embedding=hf["tie_word_embeddings"],
                                         dtype=jnp.float32, param_dtype=jnp.float32)
        load = qwen3_params.create_model_from_safe_tensors
    elif kind == "llama":
        # Llama3's config has no dtype fields: parameters and activations follow the loaded
        # (float32) arrays.
        config = llama3_model.ModelConfig(**dims, weight_tying=hf["tie_word_embeddings"])
        load = llama3_params.create_model_from_safe_tensors
    else:
        raise SystemExit(f"unsupported model_type {kind!r}")
    model = load(model_dir, config, mesh=mesh, dtype=jnp.float32)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {"float32"}, dtypes
    info = {"model_type": kind, "rope_theta_config": rope_theta(hf),
            "rope_theta_used": TUNIX_ROPE_THETA, "rope_theta_ignored": True}
    return model, info


def load_tokenizer(model_dir: str) -> Any:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    # SmolLM2's tokenizer pads with <|im_end|>, and Tunix builds its attention masks and
    # positions from `tokens != pad_id`, which would blank out every turn end of the ChatML
    # prompt. Pad with <|endoftext|> instead (absent from the prompts); shapes and timing are
    # unchanged.
    if tokenizer.pad_token_id == tokenizer.eos_token_id and "<|endoftext|>" in tokenizer.vocab:
        tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def chat_prompts(tokenizer: Any) -> list[str]:
    return [tokenizer.apply_chat_template(workload.messages(q), add_generation_prompt=True,
                                          tokenize=False) for q, _ in workload.QUESTIONS]


def tunix_prompt_tokens(tokenizer: Any, text: str) -> int:
    """Prompt length as `Sampler.tokenize` counts it: BOS prepended, then a doubled BOS dropped."""
    ids = tokenizer.encode(text)
    if tokenizer.bos_token_id and ids[:1] == [tokenizer.bos_token_id]:
        return len(ids)
    return len(ids) + (1 if tokenizer.bos_token_id else 0)


def make_mesh() -> jax.sharding.Mesh:
    return mesh_lib.create_mesh((1, 1), ("fsdp", "tp"))


def common_facts(model_dir: str, task: str, rows: int, new_tokens: int) -> dict[str, Any]:
    return {"library": "tunix", "version": importlib.metadata.version("google-tunix"),
            "jax": jax.__version__, "flax": importlib.metadata.version("flax"), "task": task,
            "model": os.path.basename(os.path.normpath(model_dir)), "rows": rows,
            "new_tokens": new_tokens}


# --- sampler ---------------------------------------------------------------------------------

def run_sampler(model_dir: str, new_tokens: int, repeats: int, temperature: float,
                top_p: float) -> dict[str, Any]:
    mesh = make_mesh()
    model, info = load_model(model_dir, mesh)
    tokenizer = load_tokenizer(model_dir)
    prompts = [p for p in chat_prompts(tokenizer) for _ in range(workload.NUM_SAMPLES)]
    prompt_len = max(tunix_prompt_tokens(tokenizer, p) for p in prompts)
    cfg = model.config
    sampler = sampler_lib.Sampler(
        model, tokenizer,
        sampler_lib.CacheConfig(cache_size=prompt_len + new_tokens, num_layers=cfg.num_layers,
                                num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    greedy = temperature == 0.0

    def generate() -> base_sampler.SamplerOutput:
        out = sampler(prompts, max_generation_steps=new_tokens, max_prompt_length=prompt_len,
                      temperature=temperature, top_p=None if greedy else top_p, top_k=None,
                      eos_tokens=[NEVER_EOS], seed=0)
        # The call ends with a device-to-host copy of the token buffer, so it has finished.
        assert out.padded_prompt_tokens.shape == (len(prompts), prompt_len)
        lengths = {len(t) for t in out.tokens}
        assert lengths == {new_tokens}, lengths
        return out

    times, first = workload.timed(generate, repeats)
    rows = len(prompts)
    median = workload.summary(times)["median_s"]
    return {**common_facts(model_dir, "sampler", rows, new_tokens), "temperature": temperature,
            "top_p": top_p, "prompt_tokens_padded": prompt_len,
            "kv_cache_size": prompt_len + new_tokens, "times_s": times, "first_s": first,
            **workload.summary(times), "tokens_per_s": rows * new_tokens / median,
            "peak_rss_mb": workload.peak_rss_mb(), **info}


# --- RL (GRPO) -------------------------------------------------------------------------------

def exact_match(prompts: list[str], completions: list[str], answer: list[str],
                **_: Any) -> list[float]:
    """Tunix reward-function signature around the shared `workload.reward`."""
    return [workload.reward(c, str(a)) for c, a in zip(completions, answer, strict=True)]


class StampedBatches:
    """The same batch `count` times; stamps the clock whenever the learner asks for one."""

    def __init__(self, batch: dict[str, np.ndarray], count: int) -> None:
        self.batch, self.count = batch, count
        self.stamps: list[float] = []

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for _ in range(self.count):
            self.stamps.append(time.perf_counter())
            yield {k: v.copy() for k, v in self.batch.items()}
        self.stamps.append(time.perf_counter())  # asked for one more: the last step is done

    def step_times(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.stamps)]


class GenerateTimer:
    """Wraps an `RLCluster.generate` (instance attribute) to time it and record lengths."""

    def __init__(self, cluster: rl_cluster_lib.RLCluster) -> None:
        self.times: list[float] = []
        self.lengths: list[list[int]] = []
        self._inner: Callable[..., base_rollout.RolloutOutput] = cluster.generate
        cluster.generate = self  # shadows the method on this instance only

    def __call__(self, *args: Any, **kwargs: Any) -> base_rollout.RolloutOutput:
        start = time.perf_counter()
        out = self._inner(*args, **kwargs)  # tokens come back as host numpy arrays
        self.times.append(time.perf_counter() - start)
        self.lengths.append([len(t) for t in out.tokens])
        return out


def run_rl(model_dir: str, new_tokens: int, repeats: int, temperature: float,
           top_p: float) -> dict[str, Any]:
    rl = workload.RL
    steps = 1 + repeats
    mesh = make_mesh()
    model, info = load_model(model_dir, mesh)
    tokenizer = load_tokenizer(model_dir)
    questions = workload.QUESTIONS[:rl["num_prompts"]]
    prompts = chat_prompts(tokenizer)[:rl["num_prompts"]]
    # Tunix pads prompts to `max_prompt_length` and never truncates them (a longer prompt makes
    # it pad to the next power of two instead), so the limit is the shared 64 or the longest
    # prompt if that is longer.
    prompt_len = max(rl["max_prompt_tokens"], *(tunix_prompt_tokens(tokenizer, p)
                                                for p in prompts))
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=new_tokens, temperature=temperature, top_p=top_p, top_k=None,
        max_prompt_length=prompt_len, kv_cache_size=prompt_len + new_tokens,
        eos_tokens=[NEVER_EOS], data_type=jnp.float32)
    training_config = rl_cluster_lib.RLTrainingConfig(
        # Weight decay 0, as in the Hugging Face Trainer (TRL) default.
        actor_optimizer=optax.adamw(learning_rate=rl["lr"], weight_decay=0.0),
        eval_every_n_steps=10**9,
        # One past the data, so the learner ends by asking for a batch (see StampedBatches).
        max_steps=steps + 1,
        # mini batch = micro batch = rollout batch = the full 4-prompt batch: one update.
        mini_batch_size=None, train_micro_batch_size=None, rollout_micro_batch_size=None,
        compute_logps_micro_batch_size=None,
        checkpoint_root_directory=None, metrics_logging_options=None)
    cluster = rl_cluster_lib.RLCluster(
        actor=model, reference=None, tokenizer=tokenizer,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                          rl_cluster_lib.Role.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False, training_config=training_config,
            rollout_config=rollout_config))
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=[exact_match],
        algo_config=grpo_learner.GRPOConfig(
            num_generations=rl["num_samples"], num_iterations=1, beta=0.0,
            epsilon=rl["epsilon"]))
    assert not learner.should_sync_weights  # actor and rollout share their weights
    generate_timer = GenerateTimer(cluster)
    batches = StampedBatches({"prompts": np.array(prompts),
                              "answer": np.array([a for _, a in questions])}, steps)
    learner.train(batches)

    all_times = batches.step_times()
    assert len(all_times) == steps, batches.stamps
    assert cluster.actor_trainer.train_steps == steps, cluster.actor_trainer.train_steps
    assert len(generate_timer.times) == steps, generate_timer.times
    rows = rl["num_prompts"] * rl["num_samples"]
    lengths = [n for step in generate_timer.lengths for n in step]
    assert len(lengths) == steps * rows and set(lengths) == {new_tokens}, sorted(set(lengths))
    times = all_times[1:]
    return {**common_facts(model_dir, "rl", rows, new_tokens), "temperature": temperature,
            "top_p": top_p, "prompt_tokens_padded": prompt_len,
            "kv_cache_size": prompt_len + new_tokens, "times_s": times,
            "first_s": all_times[0], **workload.summary(times),
            "generation_fraction": sum(generate_timer.times[1:]) / sum(times),
            "generation_s": generate_timer.times[1:], "peak_rss_mb": workload.peak_rss_mb(),
            "mean_completion_tokens": sum(lengths) / len(lengths), **info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["sampler", "rl"], required=True)
    ap.add_argument("--model", required=True, help="model directory (safetensors + tokenizer)")
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    args = ap.parse_args()
    if args.task == "sampler":
        defaults = (workload.TEMPERATURE, workload.TOP_P)
        run = run_sampler
    else:
        defaults = (workload.RL["temperature"], workload.RL["top_p"])
        run = run_rl
    temperature = defaults[0] if args.temperature is None else args.temperature
    top_p = defaults[1] if args.top_p is None else args.top_p
    workload.emit(run(args.model, args.new_tokens, args.repeats, temperature, top_p))


if __name__ == "__main__":
    main()
