"""agriclip-jax: AgriCLIP (CLIP + DINO + linear aligner) in JAX/Flax."""

__version__ = "0.1.0"
