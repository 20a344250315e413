"""A module that queries the GPU when it is imported, as some of SGLang's model files do (a forkserver test)."""
import torch

CAPABILITY = torch.cuda.get_device_capability()
