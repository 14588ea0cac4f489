"""The README's first command: CaT at test time on real weights (SmolLM2-135M-Instruct).

    python -m catjax.main --config=configs/demo.py --workdir=runs/demo

G=4 rollouts for 8 GSM8K questions, the anchor's question-blind synthesis, and the selection
baselines (single sample, majority vote, min perplexity, self-selected best-of-N; mutual
predictability, the costliest on a CPU, is left to configs/eval_gsm8k.py), scored against
gold. SmolLM2-135M is weak (it rarely boxes answers), so the answer extraction falls back to
"#### n", "the answer is ..." and the last number. A rerun reuses the records already in the
workdir.
"""

from configs import eval_gsm8k


def get_config(arg: str = ""):
    config = eval_gsm8k.get_config(arg or "model=smollm2,n=8,g=4")
    config.round.max_new_tokens = 128
    config.round.synthesis_max_new_tokens = 128
    config.eval.g_values = (1, 2, 4)
    config.eval.baselines = ("majority", "min_ppl", "self_select")
    return config
