"""`insect visualize`: the feature maps (activations) of chosen layers for one image.

Layers are numbered as the model's leaf modules in definition order (`model.named_modules()`
without the containers). For torchvision's VGG-16 that makes 0-30 the indices of
`model.features` (conv, ReLU and max-pool layers), 31 the average pool and 32-38 the
classifier, so `--layers 5,30` means `features[5]` and `features[30]`, as in the reference
article.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from insectlib import storage
from insectlib.config import DecodeLimits, VisualizeConfig
from insectlib.data.images import eval_transform, load_image, normalize, resize_size
from insectlib.errors import InsectError
from insectlib.metrics.charts import feature_maps_png
from insectlib.model.network import load_model


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module without children, in definition order."""
    return [(name, m) for name, m in model.named_modules() if not list(m.children())]


def layer_table(model: nn.Module) -> str:
    return "\n".join(
        f"  {i:3d}  {name:<20} {type(m).__name__}"
        for i, (name, m) in enumerate(leaf_modules(model))
    )


def feature_maps(
    model: nn.Module, image: torch.Tensor, layers: list[int]
) -> dict[int, tuple[str, nn.Module, np.ndarray]]:
    """{layer: (name, module, activation)} for one normalised (3, H, W) image."""
    leaves = leaf_modules(model)
    missing = [i for i in layers if not 0 <= i < len(leaves)]
    if missing:
        raise InsectError(
            f"no layer {', '.join(map(str, missing))}: this model has layers 0-{len(leaves) - 1}:"
            f"\n{layer_table(model)}"
        )
    outputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i in layers:
        # A copy: a following in-place ReLU would otherwise overwrite what was captured.
        hook = leaves[i][1].register_forward_hook(
            lambda m, args, out, i=i: outputs.__setitem__(i, out.detach().clone())
        )
        hooks.append(hook)
    try:
        with torch.no_grad():
            model.eval()(image.unsqueeze(0))
    finally:
        for hook in hooks:
            hook.remove()
    result = {}
    for i in layers:
        out = outputs[i][0]
        if out.dim() != 3:
            raise InsectError(
                f"layer {i} ({leaves[i][0]}, {type(leaves[i][1]).__name__}) has no feature "
                f"maps: its output has shape {tuple(out.shape)}; pick a layer with a "
                f"(channels, height, width) output:\n{layer_table(model)}"
            )
        result[i] = (leaves[i][0], leaves[i][1], out.float().numpy())
    return result


def check_places(cfg: VisualizeConfig) -> None:
    """Refuse an IMAGE that is a folder or is not there, then an --output that is a file,
    holds the model, or lies in the image's folder, where the next classification of that
    folder would read its pictures as images."""
    if storage.is_dir(cfg.image, cfg.s3):
        raise InsectError(f"IMAGE {cfg.image} is a folder; give one image file")
    if not storage.exists(cfg.image, cfg.s3):
        raise InsectError(f"IMAGE {cfg.image} does not exist")
    folder = cfg.image.rsplit("/", 1)[0] if "/" in cfg.image else "."
    storage.check_location(cfg.output, {"the model": cfg.model}, s3=cfg.s3)
    storage.check_not_inside(cfg.output, folder, "the image's folder")


def visualize(cfg: VisualizeConfig) -> list[str]:
    """Write one PNG grid per requested layer; returns their URIs."""
    cfg.validate()
    check_places(cfg)
    model, meta = load_model(cfg.model, cfg.s3)
    transform, min_side = eval_transform(meta.image_size), resize_size(meta.image_size)
    with storage.user_errors(cfg.image):
        image = load_image(cfg.image, transform, min_side, DecodeLimits(), cfg.s3)
    x = normalize(image.unsqueeze(0))[0]
    written = []
    for i, (name, module, activation) in feature_maps(model, x, cfg.layers).items():
        c, h, w = activation.shape
        title = (
            f"layer {i}: {name} ({type(module).__name__}), "
            f"{min(c, cfg.max_maps)} of {c} maps of {h}x{w}"
        )
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        uri = storage.join(cfg.output, f"layer-{i:03d}-{safe}.png")
        storage.write_bytes(uri, feature_maps_png(activation, title, cfg.max_maps), cfg.s3)
        written.append(uri)
    return written
