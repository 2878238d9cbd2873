"""vrl_jax: RL with verifiable rewards for vision-language models in JAX/Flax.

Importing the package never initialises a device: backends start on first use.
"""

__version__ = "0.1.0"
