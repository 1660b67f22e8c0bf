"""agriclip-jax: AgriCLIP (CLIP + DINO + linear aligner) in JAX/Flax.

    import agriclip_jax as ac
    model = ac.load("models/clip")                      # or ac.load(clip=..., dino=..., aligner=...)
    model.classify(["leaf.jpg"], ["rust", "blight", "healthy"])

See agriclip_jax/api.py. The API is imported on first use, so `import agriclip_jax` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["load", "Model", "Prediction"]


def __getattr__(name):
  if name in __all__:
    from agriclip_jax import api
    return getattr(api, name)
  raise AttributeError(f"module 'agriclip_jax' has no attribute {name!r}")
