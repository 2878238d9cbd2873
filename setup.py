"""vrl_jax: reinforcement learning for vision-language models in JAX/Flax."""
from setuptools import find_packages, setup

# The test extra adds only the oracle and the test tools. It pins the oracle: transformers' behaviour
# (positions, key layouts) changes between versions, and a looser torch requirement would pull CUDA wheels.
# Everything the CLIs need (train, evaluate, report, convert to-orbax/to-hf, synthgeo, audit) is in
# install_requires: .ci/run runs the main command and evaluate in a virtual environment without this extra.
TEST = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "pytest>=8",
    "pytest-xdist>=3.8",  # the README's test command runs two workers (one per core of a CI machine)
    "tensorflow-datasets==4.9.10",
    # The oracle of the LoRA export (tests/test_lora_export.py): peft loads our adapter directory; pinned like
    # transformers, since its key names and config fields follow transformers' module layout.
    "peft==0.21.2",
]

setup(
    name="vrl_jax",
    version="0.1.0",
    description="RL with verifiable rewards for vision-language models, in JAX/Flax (MAYE, DyME).",
    packages=find_packages(include=["vrl_jax", "vrl_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.23.0,<6",
        "tokenizers",
        "jinja2>=3.1",  # transformers renders chat templates with it (and does not require it)
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        # Imported directly (the trainer's flags, checkpoint paths, bfloat16 safetensors), so named here
        # rather than trusted to arrive with jax, orbax or ml-collections.
        "absl-py",
        "etils[epath]",
        "ml-dtypes",
        "numpy",
        "pillow",
        "safetensors",
        "math-verify==0.9.0",
        "pyarrow",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "lemminflect>=0.2.3",  # DyME's thinking reward without spaCy (rewards/visual/keywords.py)
    ],
    extras_require={
        "test": TEST,
        "tfds": ["tensorflow-datasets>=4.9.10"],
        "wandb": ["wandb"],
        # gs:// workdirs: epath reaches buckets through gcsfs; orbax asks google-cloud-storage about the bucket.
        "gcs": ["gcsfs", "google-cloud-storage"],
        # DyME's thinking reward as its released run computes it; then `python -m spacy download
        # en_core_web_sm`. Without it the reward uses the offline lemminflect approximation.
        "spacy": ["spacy>=3.7,<3.9"],
    },
    entry_points={
        "console_scripts": [
            "vrl-convert=vrl_jax.convert:cli",
        ],
    },
)
