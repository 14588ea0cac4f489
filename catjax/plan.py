"""Per-chip HBM plan for a CaT-RL run: what each chip holds, whether it fits, the largest batch.

    python -m catjax.plan --config=configs/cat_rl.py:model=qwen3_4b --topology=v5p-8
    python -m catjax.plan --config=configs/cat_rl.py:model=llama31_8b --devices=16 --hbm_gb=32 --json
    python -m catjax.plan --paper_table     # markdown: the paper's three models on common slices

`--config.X=...` overrides work as for `catjax.main`; `plan(config, devices, hbm_bytes)` is the
same thing for code. GiB = 2**30 bytes throughout (`--hbm_gb` too), as TPU HBM is quoted.

A step has three phases that never overlap, on top of what every chip always holds (policy,
frozen anchor, AdamW moments): rollouts, the anchor's synthesis, the update. The peak is
`persistent + max(phases)`, checked against `HBM * (1 - headroom)`; the headroom (10%) is for
what is not modelled: XLA's own workspace, fragmentation, small buffers.

How each number is obtained (nothing is allocated; big models stay `ShapeDtypeStruct`s):
- Weights: every leaf's per-chip shard shape from `parallel.param_shardings` on an
  `AbstractMesh` of the config's mesh (the trainer's placement: a dimension the axis does not
  divide stays replicated).
- Optimizer state: `jax.eval_shape(opt.init, abstract_params)` of the trainer's optimizer; the
  moments are sharded like their parameters (as the trainer places them), counts replicated.
- KV caches: the decoder's `KVCache` [L, B, K, S, H] in bfloat16 (the sampler's accelerator
  dtype) with the batch split over the data-parallel axes. Rollouts: ceil(batch/dp)*G rows of
  (bucketed prompt + max_new_tokens) slots; the prefill's ceil(batch/dp) rows are still live
  when they are repeated G times. Synthesis: ceil(batch/dp) rows; its prompt holds the G
  rollouts, G * max_new_tokens + the template's length (counted at 3 characters a token).
- Sampler workspace: the prefill (`models.prefill`) runs the prompt through every layer a chunk
  of C = min(P, the decoder's `DEFAULT_Q_CHUNK`) positions at a time, so one layer's scores
  [b, heads, C, S] in float32, the probabilities in the model dtype and the MLP's [b, C, F]
  intermediates are what it holds (whole, the ~13k-token synthesis prompt of a 4B model would
  need tens of GiB per question). Decoding adds a few float32 [rows, vocab] buffers, and
  XLA's TPU compiler keeps a float32 copy of the output head (the final norm's weight folded in)
  for the whole call.
- Update (`trainer.train_step`): compiled on one CPU device with abstract full-size params at
  G and 2G rows; XLA's `memory_analysis()` temp bytes give temp(rows) = a + b * rows. A per-chip
  compile is not possible (a shard of a weight is not a smaller model), but the two parts split
  cleanly: b * (rows per chip) are the activations (linear in the batch), and a holds the
  parameter-sized buffers of the update (float32 gradient accumulator, the gradient in the
  parameters' dtype, Adam's updates), which shard with the parameters, so a chip holds
  a * (its share of the parameter bytes). The gradient line is the float32 accumulator, the rest
  of a is "update temporaries". `rl.micro_batch` is not credited (an upper bound: the fit runs
  all rows as one micro-batch; the trainer splits the anchor's pass and the update alike).

Cross-checked against XLA's TPU compiler (libtpu 0.0.42 deviceless AOT, Qwen 3 4B, temporaries
per chip, TPU vs this plan): update on v5e 2x4 (fsdp 8), 1 row/chip of 2048 tokens: 8.79 vs
9.68 GiB; rollouts on v5e 2x2 (data 4), 1 and 2 questions/chip: 3.88 vs 4.00 and 6.13 vs
6.55 GiB; synthesis on v5e 2x2 (data 4), 1 question/chip, a 13,312-slot prompt + 1,536 new
tokens: 5.36 vs 6.36 GiB (6.19 GiB on the TPU before the prefill ran in chunks).

Assumed, not modelled: the sampler splits its batch over the data-parallel axes (as
`sampling.sample(mesh=...)` does); free-form rubric proposals and a local judge (both smaller
than the synthesis); host memory.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

from catjax import models, parallel, sampling
from catjax.models import ModelConfig
from catjax.models.decoder import DEFAULT_Q_CHUNK

GiB = 2**30
KV_BYTES = 2  # the sampler's cache dtype on accelerators (bfloat16)
CHARS_PER_TOKEN = 3  # conservative for English and LaTeX (most tokenizers average ~4)
CHAT_TEMPLATE_TOKENS = 32  # role markers and the generation prompt


def _topologies() -> dict[str, tuple[int, float]]:
    """name -> (chips, HBM GiB per chip). v5e/v6e names count chips, v4/v5p TensorCores (2/chip)."""
    out = {}
    for n in (1, 4, 8, 16, 32, 64, 128, 256):
        out[f"v5e-{n}"] = (n, 16.0)
        out[f"v6e-{n}"] = (n, 32.0)
    for n in (8, 16, 32, 64, 128, 256, 512):
        out[f"v5p-{n}"] = (n // 2, 95.0)
        out[f"v4-{n}"] = (n // 2, 32.0)
    return out


TOPOLOGIES = _topologies()
PAPER_MODELS = ("gemma3_4b", "qwen3_4b", "llama31_8b")
PAPER_SLICES = ("v5e-8", "v5p-8", "v4-32", "v6e-8")


def topology(name: str) -> tuple[int, int]:
    """(chips, HBM bytes per chip) of a Cloud TPU slice name such as v5e-8 or v5litepod-8."""
    key = name.strip().lower().replace("v5litepod-", "v5e-")
    if key not in TOPOLOGIES:
        raise ValueError(f"--topology={name!r} is unknown; known: v5e-N, v6e-N (N chips), "
                         f"v5p-N, v4-N (N TensorCores = 2N chips), e.g. {', '.join(PAPER_SLICES)}")
    chips, gib = TOPOLOGIES[key]
    return chips, int(gib * GiB)


# --- what the config describes ---------------------------------------------------------------

def model_config(config: Any, preset: str = "") -> ModelConfig:
    """The architecture (no weights): `preset`, or a preset named by `config.model.init`
    ('random:NAME', 'smollm2', a path ending in a preset name such as gs://B/qwen3_4b) or a local
    Hugging Face directory's config.json; then the config's dtype and remat."""
    mc = config.model
    init = str(mc.get("init", ""))
    dtype = mc.get("dtype") or None
    overrides: dict[str, Any] = {"dtype": dtype} if dtype else {}
    name = preset
    if not name and init.startswith("random:"):
        name = init.split(":", 1)[1]
        if mc.get("vocab_size"):
            overrides["vocab_size"] = int(mc.vocab_size)
    elif not name and init == "smollm2":
        name = "smollm2_135m"
    elif not name:
        base = init.rstrip("/").rsplit("/", 1)[-1].lower().replace("-", "_").replace(".", "")
        if base in models.PRESETS:
            name = base
        else:
            cfg_path = os.path.join(init, "config.json")
            if not os.path.isfile(cfg_path):
                raise ValueError(f"config.model.init={init!r} names no preset and is no local model "
                                 f"directory: pass --model_preset (one of {sorted(models.PRESETS)})")
            from catjax.models import hf

            with open(cfg_path) as f:
                cfg = hf.config_from_hf(json.load(f), cfg_path, dtype=dtype)
            return cfg.replace(remat=bool(config.get("remat", False)))
    cfg = models.get_preset(name, **overrides)
    return cfg.replace(remat=bool(config.get("remat", False)))


def mesh_sizes(mesh_cfg: Any, devices: int) -> dict[str, int]:
    """The config's (data, fsdp, tensor) sizes on `devices` chips (-1 takes what is left)."""
    sizes = [int(mesh_cfg.get("data", -1)), int(mesh_cfg.get("fsdp", 1)),
             int(mesh_cfg.get("tensor", 1))]
    desc = f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]})"
    if devices < 1:
        raise ValueError(f"--devices={devices} must be >= 1")
    if sizes.count(-1) > 1:
        raise ValueError(f"{desc}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known < 1 or devices % known:
            raise ValueError(f"--devices={devices} does not split into {desc}")
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices:
        raise ValueError(f"--devices={devices} does not split into {desc}: it needs "
                         f"{math.prod(sizes)} devices")
    return dict(zip(parallel.AXES, sizes, strict=True))


def synthesis_prompt_tokens(num_rollouts: int, max_new_tokens: int, kind: str = "math",
                            style: str = "default") -> int:
    """Unpadded length of the anchor's synthesis prompt over G full-length rollouts."""
    from catjax.cat import prompts

    args = (kind,) if style == "default" else (kind, style)
    text = prompts.synthesis([""] * num_rollouts, *args)[0]["content"]
    return num_rollouts * max_new_tokens + -(-len(text) // CHARS_PER_TOKEN) + CHAT_TEMPLATE_TOKENS


# --- bytes -------------------------------------------------------------------------------------

def _abstract_mesh(sizes: dict[str, int]) -> jax.sharding.AbstractMesh:
    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in parallel.AXES), parallel.AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(parallel.AXES))


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(math.prod(shape)) * jnp.dtype(dtype).itemsize


def param_bytes(cfg: ModelConfig, sizes: dict[str, int]) -> tuple[int, int]:
    """(bytes on one chip, bytes in all) of the parameters, sharded as the trainer shards them."""
    shapes = models.param_shapes(cfg)
    shardings = parallel.param_shardings(shapes, models.logical_axes(cfg), _abstract_mesh(sizes))
    is_shape = lambda x: isinstance(x, tuple)
    per_chip = jax.tree.map(lambda s, sh: _nbytes(sh.shard_shape(s), cfg.dtype), shapes, shardings,
                            is_leaf=is_shape)
    full = jax.tree.map(lambda s: _nbytes(s, cfg.dtype), shapes, is_leaf=is_shape)
    return sum(jax.tree.leaves(per_chip)), sum(jax.tree.leaves(full))


def master_config(cfg: ModelConfig) -> ModelConfig:
    """The policy's master weights: float32, whatever the compute dtype (as the trainer keeps
    them; a bf16 weight cannot take an update of the paper's lr 5e-7)."""
    return cfg.replace(dtype="float32")


def opt_state_bytes(cfg: ModelConfig, opt: optax.GradientTransformation,
                    sizes: dict[str, int]) -> int:
    """Optimizer state on one chip: moments sharded like their parameters, the rest replicated."""
    shapes = models.param_shapes(cfg)
    shardings = parallel.param_shardings(shapes, models.logical_axes(cfg), _abstract_mesh(sizes))
    state = jax.eval_shape(opt.init, models.abstract_params(master_config(cfg)))
    per_leaf = optax.tree_utils.tree_map_params(
        opt, lambda x, sh: _nbytes(sh.shard_shape(x.shape), x.dtype), state, shardings,
        transform_non_params=lambda x: _nbytes(x.shape, x.dtype))
    return int(sum(jax.tree.leaves(per_leaf)))


def kv_cache_bytes(cfg: ModelConfig, rows: int, slots: int, itemsize: int = KV_BYTES) -> int:
    """Keys and values of a `KVCache` [L, B, K, S, H] (see `models.init_cache`)."""
    return 2 * cfg.num_layers * rows * cfg.num_kv_heads * slots * cfg.head_dim * itemsize


def prefill_workspace_bytes(cfg: ModelConfig, rows: int, prompt: int, slots: int) -> int:
    """One layer's prefill temporaries for a chunk of C positions (`models.prefill`): float32
    scores and model-dtype probabilities [b, n, C, S], the [b, C, S] masks, and the MLP's
    [b, C, F] intermediates."""
    item = cfg.jnp_dtype.itemsize
    block = min(prompt, DEFAULT_Q_CHUNK)
    scores = rows * cfg.num_heads * block * slots * (4 + item)
    masks = rows * block * slots * (2 + cfg.num_heads // cfg.num_kv_heads)
    mlp = rows * block * (3 * cfg.mlp_dim + 2 * cfg.hidden_size) * item
    return scores + masks + mlp


def decode_workspace_bytes(cfg: ModelConfig, rows: int) -> int:
    """Per-step float32 [rows, vocab] buffers: logits, log-softmax, scaled logits, probabilities."""
    return 4 * rows * cfg.vocab_size * 4


def head_copy_bytes(cfg: ModelConfig, sizes: dict[str, int]) -> int:
    """XLA's TPU compiler folds the final norm's weight into the output head, once, outside the
    decode loop: a float32 copy of the head's shard on every chip (1.45 GiB for Qwen 3 4B)."""
    shapes = models.param_shapes(cfg)
    name = "embed" if cfg.tie_embeddings else "lm_head"
    sharding = parallel.param_shardings({name: shapes[name]}, {name: models.logical_axes(cfg)[name]},
                                        _abstract_mesh(sizes))[name]
    return _nbytes(sharding.shard_shape(shapes[name]), jnp.float32)


def sampler_phase_bytes(cfg: ModelConfig, prompts: int, samples: int, prompt: int, new: int,
                        head_copy: int = 0) -> tuple[int, int]:
    """(KV cache, workspace) of one `sampling.sample` call on one chip; their sum is its peak."""
    slots = prompt + new
    kv = kv_cache_bytes(cfg, prompts * samples, slots)
    prefill_cache = kv_cache_bytes(cfg, prompts, slots)
    # The prefill cache is repeated G times into the decode cache (no copy when G == 1).
    held = prefill_cache if samples > 1 else 0
    peak = head_copy + max(prefill_cache + prefill_workspace_bytes(cfg, prompts, prompt, slots),
                           kv + held + decode_workspace_bytes(cfg, prompts * samples))
    return kv, peak - kv


# --- the update, measured by XLA ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainFit:
    """temp(rows) = intercept + per_row * rows of `train_step` on one device (full parameters)."""

    intercept: int
    per_row: int
    param_bytes: int  # all parameter bytes of the compiled step (to scale `intercept` to a chip)
    grad_bytes: int  # the gradient accumulator (float32)
    rows: tuple[int, int]
    temp: tuple[int, int]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _train_batch(rows: int, width: int, new: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract `trainer.build_batch` output: prompt [width] + completion [new] per row."""
    s, i32, f32 = jax.ShapeDtypeStruct, jnp.int32, jnp.float32
    return dict(tokens=s((rows, width + new), i32), positions=s((rows, width + new), i32),
                key_mask=s((rows, width + new), bool), pred_index=s((rows, new), i32),
                targets=s((rows, new), i32), mask=s((rows, new), f32), rewards=s((rows,), f32))


def _train_temp_bytes(cfg: ModelConfig, rl: Any, opt: Any, state: Any, rows: int, width: int,
                      new: int) -> int:
    from catjax.rl import trainer

    anchor = models.abstract_params(cfg)
    master = models.abstract_params(master_config(cfg))
    lowered = trainer.train_step.lower(cfg, master, state, anchor, _train_batch(rows, width, new),
                                       rl=rl, opt=opt)
    # LLVM's optimisation level does not change buffer assignment; level 0 halves compile time.
    compiled = lowered.compile({"xla_backend_optimization_level": 0})
    return int(compiled.memory_analysis().temp_size_in_bytes)


@functools.lru_cache(maxsize=32)
def _fit_train(cfg: ModelConfig, rl: Any, optimizer: tuple, width: int, new: int) -> TrainFit:
    import ml_collections

    from catjax.rl import trainer

    opt = trainer.make_optimizer(ml_collections.ConfigDict(dict(optimizer)), 1000)
    state = jax.eval_shape(opt.init, models.abstract_params(master_config(cfg)))
    rl = dataclasses.replace(rl, micro_batch=0)
    rows = (rl.num_rollouts, 2 * rl.num_rollouts)
    # Compile for the host CPU even on a TPU VM: one chip cannot hold a 4B update unsharded.
    with jax.default_device(jax.devices("cpu")[0]):
        temp = [_train_temp_bytes(cfg, rl, opt, state, r, width, new) for r in rows]
    per_row = max(0, (temp[1] - temp[0]) // (rows[1] - rows[0]))
    _, full = param_bytes(cfg, {"data": 1, "fsdp": 1, "tensor": 1})
    item = cfg.jnp_dtype.itemsize
    return TrainFit(intercept=max(0, temp[0] - per_row * rows[0]), per_row=per_row,
                    param_bytes=full, grad_bytes=full // item * max(item, 4), rows=rows,
                    temp=(temp[0], temp[1]))


def measure_train(cfg: ModelConfig, config: Any, prompt_tokens: int) -> TrainFit:
    """Fit the update's temporaries for the config (compiles `train_step` twice, cached)."""
    rl = _rl_config(config)
    width = sampling.bucket_length(prompt_tokens)
    optimizer = tuple(sorted(dict(config.optimizer).items()))
    return _fit_train(cfg, rl, optimizer, width, int(config.round.max_new_tokens))


def _rl_config(config: Any) -> Any:
    from catjax.rl import trainer

    return trainer.RLConfig.from_config(config.rl, int(config.round.num_rollouts),
                                        float(config.round.get("temperature", 1.0)))


# --- the plan ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """Bytes per chip of every buffer, the verdict and the largest batch that fits."""

    model: str
    dtype: str
    remat: bool
    devices: int
    mesh: dict[str, int]
    hbm_bytes: int
    headroom: float
    batch_size: int
    num_rollouts: int
    prompt_len: int  # bucketed
    max_new_tokens: int
    synthesis_prompt_len: int  # bucketed
    synthesis_max_new_tokens: int
    train_rows_per_chip: int
    questions_per_chip: int
    bytes: dict[str, int]  # per chip
    phases: dict[str, int]  # per chip: persistent, rollouts, synthesis, training
    peak_bytes: int
    usable_bytes: int
    fits: bool
    binding_phase: str
    max_batch_size: int  # 0: not even the smallest valid batch fits
    train_fit: dict[str, Any]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _phase_bytes(cfg: ModelConfig, batch: int, g: int, dp: int, prompt: int, new: int,
                 syn_prompt: int, syn_new: int, param_chip: int, opt_chip: int, head: int,
                 fit: TrainFit) -> tuple[dict[str, int], dict[str, int]]:
    q = -(-batch // dp)  # the sampler pads the questions to a multiple of dp
    rows = batch * g // dp
    share = param_chip / fit.param_bytes
    roll_kv, roll_ws = sampler_phase_bytes(cfg, q, g, prompt, new, head)
    syn_kv, syn_ws = sampler_phase_bytes(cfg, q, 1, syn_prompt, syn_new, head)
    grads = int(fit.grad_bytes * share)
    # Float32 master weights; the rollouts read a copy cast to the compute dtype.
    master_chip = param_chip * 4 // cfg.jnp_dtype.itemsize
    copy = param_chip if master_chip != param_chip else 0
    b = {
        "policy_params": master_chip, "policy_compute_copy": copy, "anchor_params": param_chip,
        "optimizer_state": opt_chip,
        "rollout_kv_cache": roll_kv, "rollout_workspace": roll_ws,
        "synthesis_kv_cache": syn_kv, "synthesis_workspace": syn_ws,
        "gradients": grads, "update_temporaries": max(0, int(fit.intercept * share) - grads),
        "activations": fit.per_row * rows,
    }
    phases = {
        "persistent": b["policy_params"] + b["anchor_params"] + b["optimizer_state"],
        "rollouts": copy + roll_kv + roll_ws,
        "synthesis": copy + syn_kv + syn_ws,  # the round holds the cast copy throughout
        "training": b["gradients"] + b["update_temporaries"] + b["activations"],
    }
    return b, phases


def _peak(phases: dict[str, int]) -> tuple[int, str]:
    binding = max(("rollouts", "synthesis", "training"), key=lambda k: phases[k])
    return phases["persistent"] + phases[binding], binding


def plan(config: Any, devices: int, hbm_bytes: int, *, headroom: float = 0.1,
         prompt_tokens: int = 512, preset: str = "", train_fit: TrainFit | None = None) -> Plan:
    """Plan `config` (a cat_rl ConfigDict) on `devices` chips of `hbm_bytes` each.

    `prompt_tokens`: the longest policy prompt of a batch (bucketed as the sampler does).
    `train_fit`: a `TrainFit` from an earlier plan of the same model and lengths (skips the two
    compiles; the fit does not depend on the mesh).
    """
    if not 0 <= headroom < 1:
        raise ValueError(f"--headroom={headroom} must be in [0, 1)")
    cfg = model_config(config, preset)
    sizes = mesh_sizes(config.mesh, devices)
    dp = sizes["data"] * sizes["fsdp"]
    g = int(config.round.num_rollouts)
    batch = int(config.batch_size)
    if batch < 1 or (batch * g) % dp:
        raise ValueError(f"config.batch_size*num_rollouts={batch * g} does not split over the "
                         f"mesh's {dp} data-parallel devices (--devices={devices})")
    from catjax.rl import trainer

    opt = trainer.make_optimizer(config.optimizer, int(config.steps))
    prompt = sampling.bucket_length(prompt_tokens)
    new = int(config.round.max_new_tokens)
    kind = "math" if config.round.get("task", "math") == "math" else "freeform"
    syn_prompt = sampling.bucket_length(synthesis_prompt_tokens(
        g, new, kind, config.round.get("prompt_style", "default")))
    syn_new = int(config.round.synthesis_max_new_tokens)
    fit = train_fit or measure_train(cfg, config, prompt_tokens)
    param_chip, _ = param_bytes(cfg, sizes)
    opt_chip = opt_state_bytes(cfg, opt, sizes)
    head = head_copy_bytes(cfg, sizes)
    usable = int(hbm_bytes * (1 - headroom))

    def phases_at(b: int):
        return _phase_bytes(cfg, b, g, dp, prompt, new, syn_prompt, syn_new, param_chip, opt_chip,
                            head, fit)

    parts, phases = phases_at(batch)
    peak, binding = _peak(phases)
    notes = list(fit.notes)
    for what, total in (("rollout", prompt + new), ("synthesis", syn_prompt + syn_new)):
        if total > cfg.max_position:
            notes.append(f"{what} prompt + new tokens = {total} exceed the model's context of "
                         f"{cfg.max_position}: the sampler refuses it")
    if int(config.rl.get("micro_batch", 0) or 0):
        notes.append("rl.micro_batch is not credited: activations are planned for all rows")
    return Plan(
        model=_model_name(config, preset), dtype=cfg.dtype, remat=cfg.remat, devices=devices,
        mesh=sizes, hbm_bytes=int(hbm_bytes), headroom=headroom, batch_size=batch,
        num_rollouts=g, prompt_len=prompt, max_new_tokens=new, synthesis_prompt_len=syn_prompt,
        synthesis_max_new_tokens=syn_new, train_rows_per_chip=batch * g // dp,
        questions_per_chip=-(-batch // dp), bytes=parts, phases=phases, peak_bytes=peak,
        usable_bytes=usable, fits=peak <= usable, binding_phase=binding,
        max_batch_size=_largest_batch(lambda b: _peak(phases_at(b)[1])[0] <= usable, g, dp),
        train_fit=fit.to_dict(), notes=notes)


def _largest_batch(fits, g: int, dp: int, limit: int = 1 << 20) -> int:
    """Largest batch (a multiple of the smallest whose rows split over dp) for which `fits`.
    Every term grows with the batch, so `fits` is monotone: double, then bisect."""
    step = dp // math.gcd(g, dp)
    if not fits(step):
        return 0
    lo, hi = 1, 2  # in units of `step`: fits(lo * step), and hi is the candidate above
    while hi * step <= limit and fits(hi * step):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


def _model_name(config: Any, preset: str) -> str:
    if preset:
        return preset
    init = str(config.model.get("init", ""))
    return init.split(":", 1)[1] if init.startswith("random:") else init.rstrip("/").rsplit("/", 1)[-1]


# --- output ------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def format_plan(p: Plan, slice_name: str = "") -> str:
    """A readable table of one plan."""
    m = p.mesh
    where = f"{slice_name}: " if slice_name else ""
    b = p.bytes
    lines = [
        f"{p.model} ({p.dtype}{', remat' if p.remat else ''}) on {where}{p.devices} chips x "
        f"{p.hbm_bytes / GiB:.1f} GiB, mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}",
        f"batch {p.batch_size} questions x G {p.num_rollouts}; per chip {p.questions_per_chip} "
        f"questions, {p.train_rows_per_chip} update rows",
        f"rollouts: prompt {p.prompt_len} + {p.max_new_tokens} new; synthesis: prompt "
        f"{p.synthesis_prompt_len} + {p.synthesis_max_new_tokens} new",
        "",
        f"{'':12}{'':34}{'GiB/chip':>8}",
    ]
    rows = [
        ("persistent", "policy parameters (float32 master)", b["policy_params"]),
        ("", "frozen anchor", b["anchor_params"]),
        ("", "optimizer state (AdamW)", b["optimizer_state"]),
        ("rollouts", "policy weights in compute dtype", b["policy_compute_copy"]),
        ("", "KV cache (bf16)", b["rollout_kv_cache"]),
        ("", "prefill / decode workspace", b["rollout_workspace"]),
        ("synthesis", "KV cache (bf16)", b["synthesis_kv_cache"]),
        ("", "prefill / decode workspace", b["synthesis_workspace"]),
        ("training", "gradients", b["gradients"]),
        ("", "update temporaries", b["update_temporaries"]),
        ("", f"activations ({p.train_rows_per_chip} rows)", b["activations"]),
    ]
    lines += [f"{a:12}{c:34}{_gib(v)}" for a, c, v in rows]
    lines += [
        "",
        f"{'phase totals':12}{'':34}" + "  ".join(f"{k} {v / GiB:.2f}" for k, v in p.phases.items()),
        f"{'peak':12}{'persistent + ' + p.binding_phase:34}{_gib(p.peak_bytes)}",
        f"{'usable':12}{f'HBM - {p.headroom:.0%} headroom':34}{_gib(p.usable_bytes)}",
        f"verdict: {'fits' if p.fits else 'does not fit'}; largest batch that fits: "
        f"{p.max_batch_size or 'none (not even the smallest valid batch)'}",
    ]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def _load_cat_rl(model: str) -> Any:
    try:
        module = importlib.import_module("configs.cat_rl")
    except ImportError as e:
        raise ValueError("--paper_table reads configs/cat_rl.py: run from the repository root") from e
    return module.get_config(f"model={model}")


def paper_table(slices: tuple[str, ...] = PAPER_SLICES, model_names: tuple[str, ...] = PAPER_MODELS,
                headroom: float = 0.1, prompt_tokens: int = 512) -> str:
    """Markdown: the paper's models at their cat_rl defaults on common slices, per chip."""
    head = ("| model | slice | chips x HBM | persistent | rollouts | synthesis | update | "
            "peak (GiB/chip, batch 32) | fits | largest batch |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    notes: list[str] = []
    for name in model_names:
        config = _load_cat_rl(name)
        fit = None
        for s in slices:
            chips, hbm = topology(s)
            p = plan(config, chips, hbm, headroom=headroom, prompt_tokens=prompt_tokens,
                     train_fit=fit)
            fit = TrainFit(**{**p.train_fit, "rows": tuple(p.train_fit["rows"]),
                              "temp": tuple(p.train_fit["temp"]),
                              "notes": tuple(p.train_fit["notes"])})
            ph = p.phases
            out.append(
                f"| {name} | {s} | {chips} x {hbm / GiB:.0f} GiB | {ph['persistent'] / GiB:.1f} | "
                f"{ph['rollouts'] / GiB:.1f} | {ph['synthesis'] / GiB:.1f} | "
                f"{ph['training'] / GiB:.1f} | {p.peak_bytes / GiB:.1f} | "
                f"{'yes' if p.fits else 'no'} | {p.max_batch_size} |")
            notes += [f"{name}: {n}" for n in p.notes if f"{name}: {n}" not in notes]
    return "\n".join(out + [""] + [f"- {n}" for n in notes] if notes else out)


# --- command line ------------------------------------------------------------------------------

def _define_flags():
    # Defined on first use, not at import: catjax.main defines --config in the same flag registry.
    from absl import flags
    from ml_collections import config_flags

    return dict(
        config=config_flags.DEFINE_config_file("config", None, "Config file (configs/cat_rl.py[:arg]).",
                                               lock_config=True),
        topology=flags.DEFINE_string("topology", None, f"Cloud TPU slice, e.g. {', '.join(PAPER_SLICES)}."),
        devices=flags.DEFINE_integer("devices", None, "Chips (overrides the topology's)."),
        hbm_gb=flags.DEFINE_float("hbm_gb", None, "HBM per chip in GiB (overrides the topology's)."),
        headroom=flags.DEFINE_float("headroom", 0.1, "Fraction of HBM kept free."),
        prompt_tokens=flags.DEFINE_integer("prompt_tokens", 512, "Longest policy prompt of a batch."),
        model_preset=flags.DEFINE_string("model_preset", "", "Architecture preset when "
                                         "config.model.init names none."),
        json=flags.DEFINE_bool("json", False, "Print one JSON object."),
        paper_table=flags.DEFINE_bool("paper_table", False, "Markdown table of the paper's models "
                                      f"on {', '.join(PAPER_SLICES)}."),
    )


def _main(f: dict) -> None:
    import logging

    logging.getLogger("jax").setLevel(logging.WARNING)
    if f["paper_table"].value:
        print(paper_table(headroom=f["headroom"].value, prompt_tokens=f["prompt_tokens"].value))
        return
    if f["config"].value is None:
        raise ValueError("--config is required (or --paper_table)")
    chips, hbm, name = None, None, ""
    if f["topology"].value:
        chips, hbm = topology(f["topology"].value)
        name = f["topology"].value
    if f["devices"].value is not None:
        chips = f["devices"].value
    if f["hbm_gb"].value is not None:
        if f["hbm_gb"].value <= 0:
            raise ValueError(f"--hbm_gb={f['hbm_gb'].value} must be > 0")
        hbm = int(f["hbm_gb"].value * GiB)
    if chips is None or hbm is None:
        raise ValueError("give --topology, or --devices and --hbm_gb")
    p = plan(f["config"].value, chips, hbm, headroom=f["headroom"].value,
             prompt_tokens=f["prompt_tokens"].value, preset=f["model_preset"].value)
    if f["json"].value:
        print(json.dumps({**p.to_dict(), "topology": name or None}))
    else:
        print(format_plan(p, name))


def cli() -> None:
    from absl import app

    f = _define_flags()
    try:
        app.run(lambda argv: _main(f))
    except (ValueError, FileNotFoundError, KeyError, AttributeError) as e:
        print(f"catjax.plan: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
