"""Run LXT 2.1's efficient CP-LRP on a torchvision ViT, in its own process; write the maps.

Usage: ``python lxt_runner.py IN.pt OUT.pt``. ``IN.pt`` holds ``config`` (the
``VisionTransformer`` keyword arguments), ``state_dict``, ``images`` ``(B, 3, H, W)`` and
``target`` ``(B,)``; ``OUT.pt`` gets ``maps`` ``(B, H, W)`` and ``logits`` ``(B, K)``.

LXT's patches replace the forward methods of ``torch.nn.GELU``, ``LayerNorm`` and
``MultiheadAttention`` for the whole process, which is why this runs alone. Importing
``lxt.efficient`` would import LXT's LLaMA/BERT/... patches, which need transformers 4.x, so the
two packages are put into ``sys.modules`` as stand-ins with their real folders first, and only
``lxt.efficient.models.vit_torch`` (torchvision + ``patches`` + ``rules``) is imported, as
``lxt/efficient/models/vit_torch.py`` and ``core.py`` of LXT 2.1 show. The map is computed as in
LXT's ``examples/vit_torch.py``: pixels with ``requires_grad``, the raw logit of the target
backpropagated, ``(x * x.grad).sum(1)``.
"""

import importlib.util
import pathlib
import sys
import types

import torch


def _import_vit_patch():  # noqa: ANN202
    root = pathlib.Path(importlib.util.find_spec("lxt").submodule_search_locations[0])
    for name, sub in (("lxt.efficient", "efficient"), ("lxt.efficient.models", "efficient/models")):
        package = types.ModuleType(name)
        package.__path__ = [str(root / sub)]
        sys.modules[name] = package

    def get_default_map(module):  # noqa: ANN001, ANN202
        raise ValueError("stand-in: pass patch_map")

    sys.modules["lxt.efficient.models"].get_default_map = get_default_map
    from lxt.efficient.core import monkey_patch
    from lxt.efficient.models import vit_torch

    return monkey_patch, vit_torch


def main(source: str, destination: str) -> None:
    torch.use_deterministic_algorithms(True)
    spec = torch.load(source)
    monkey_patch, vit_torch = _import_vit_patch()
    from torchvision.models import vision_transformer as tvv

    monkey_patch(tvv, patch_map=vit_torch.cp_LRP)
    model = tvv.VisionTransformer(**spec["config"]).to(spec["images"].dtype).eval()
    model.load_state_dict(spec["state_dict"])
    for p in model.parameters():
        p.requires_grad_(False)
    x = spec["images"].clone().requires_grad_(True)
    logits = model(x)
    logits.gather(1, spec["target"][:, None]).sum().backward()
    torch.save({"maps": (x * x.grad).sum(1), "logits": logits.detach()}, destination)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
