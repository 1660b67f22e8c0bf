"""Put this folder first on PYTHONPATH to run a process as if PyTorch were not installed.

A None entry in sys.modules makes `import torch` raise ModuleNotFoundError and
`importlib.util.find_spec("torch")` return None, which is what both look like on a machine with
only requirements.txt: libraries that probe for torch (transformers) take their torch-free path.
"""

import sys

for _name in ("torch", "torchvision", "timm", "open_clip"):
  sys.modules[_name] = None
