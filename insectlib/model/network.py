"""Building, freezing, saving and loading the classifier.

A model directory holds `model.safetensors` (the full state dict) and `meta.json`
(everything needed to rebuild and feed the model, see `meta`). `meta.json` is validated
before any weights are read, and weights are only ever read as safetensors or
`weights_only` pickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import struct
import warnings

import safetensors.torch
import torch
import torchvision
from torch import nn

from insectlib import storage
from insectlib.config import FREEZE_POLICIES
from insectlib.errors import InsectError
from insectlib.layout import WEIGHTS_FILE
from insectlib.model.meta import (
    ModelMeta,
    available_archs,
    read_meta,
    versions,
    write_meta,
)
from insectlib.runtime import console


def check_arch(arch: str) -> None:
    if arch not in available_archs():
        raise InsectError(
            f"unknown --arch {arch!r}: use a torchvision classification model such as "
            "vgg16, resnet50 or efficientnet_b0 (see torchvision.models.list_models())"
        )


def check_image_size(arch: str, size: int) -> None:
    """Refuse an --image-size `arch` cannot take (VGG's five poolings need 32 px, a ViT its
    own size): one image through the model on the meta device, where shapes are checked as
    in a real pass at no cost, rather than in every training worker after Ray started."""
    model = meta_model(arch)
    if model is None:  # RegNet, built on the CPU only (seconds): it pools adaptively
        return
    image = torch.empty(1, 3, size, size, device="meta")
    try:
        with torch.no_grad():
            model.eval()(image)
    except (RuntimeError, AssertionError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InsectError(f"--arch {arch} cannot take --image-size {size}: {why}") from None


def head_name(model: nn.Module) -> str:
    """Module name of the classifier's final Linear layer (the last Linear defined)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise InsectError(f"{type(model).__name__} has no Linear layer to replace")
    return names[-1]


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the final Linear layer for a fresh `num_classes` one; returns its module name."""
    name = head_name(model)
    old = model.get_submodule(name)
    model.set_submodule(name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return name


class WithEmbedding(nn.Module):
    """A classifier that returns (logits, embedding): the embedding is what its head (the
    final Linear layer) reads, 4,096 values for VGG-16. The head is moved out and run on
    the rest's output, which is exact for torchvision's classifiers: their head is the last
    thing they compute (tests/test_model.py checks VGG, ResNet, MobileNet, EfficientNet)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        name = head_name(model)
        self.head = model.get_submodule(name)
        model.set_submodule(name, nn.Identity())
        self.trunk = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.trunk(x)
        return self.head(embedding), embedding


def embedding_size(meta: ModelMeta) -> int:
    """Values in the embedding of a `meta` model (its head's input features)."""
    model = skeleton(meta.arch)
    return model.get_submodule(head_name(model)).in_features


def skeleton(arch: str, num_classes: int | None = None) -> nn.Module:
    """`arch` without weights (and with a `num_classes` head): on the meta device, which
    costs no memory and no random init, or on the CPU for archs whose construction reads
    tensor values (RegNet computes its widths with .tolist())."""
    model = meta_model(arch) or torchvision.models.get_model(arch, weights=None)
    if num_classes is not None:
        with torch.device(next(model.parameters()).device):
            replace_head(model, num_classes)
    return model


def meta_model(arch: str) -> nn.Module | None:
    """`arch` without weights on the meta device; None for archs whose construction reads
    tensor values (RegNet computes its widths with .tolist())."""
    with warnings.catch_warnings():  # GoogLeNet's and Inception's on their initialisation
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with torch.device("meta"):
                return torchvision.models.get_model(arch, weights=None)
        except NotImplementedError:  # "Cannot copy out of meta tensor"
            return None


def apply_freeze(model: nn.Module, policy: str) -> None:
    """Set requires_grad per the freeze policy: "trunk" trains only the head."""
    if policy not in FREEZE_POLICIES:
        raise InsectError(
            f"unknown --freeze {policy!r}: choose one of {', '.join(FREEZE_POLICIES)}"
        )
    head = head_name(model) + "."
    for name, p in model.named_parameters():
        p.requires_grad = policy == "none" or name.startswith(head)


def set_train_mode(model: nn.Module, policy: str) -> None:
    """Training mode for what trains. A frozen trunk stays in eval mode, so its dropout and
    batch-norm statistics do not change: it is a fixed function of the image."""
    if policy == "trunk":
        model.eval()
        model.get_submodule(head_name(model)).train()
    else:
        model.train()


def imagenet_weights_path(arch: str) -> str:
    """Where torchvision keeps `arch`'s IMAGENET1K_V1 weights in the torch hub cache."""
    url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def ensure_imagenet_weights(arch: str, timeout_s: float = 20.0) -> None:
    """`arch`'s ImageNet weights in this machine's torch hub cache, downloaded if they are
    not there yet; one line naming the cache and the cause where they cannot be had (no
    network, an air-gapped site), before any worker starts."""
    try:
        path = imagenet_weights_path(arch)
    except (KeyError, ValueError):
        problem = f"{arch} has no IMAGENET1K_V1 weights: pass --weights random or PATH"
        raise InsectError(problem) from None
    if os.path.exists(path):
        return
    console.say(f"downloading the ImageNet weights of {arch} into {path}")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # torch.hub's download sets none of its own
    try:
        # torch.hub's own line (on stdout in some releases, stderr in others): said above
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            weights = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"]
            weights.get_state_dict(progress=False)
    except Exception as e:
        raise InsectError(
            f"ImageNet weights for {arch} are not in the torch hub cache ({path}) and cannot "
            f"be downloaded ({type(e).__name__}: {str(e)[:120]}): pass --weights random, or "
            "--weights PATH to a state-dict file"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def build_model(
    arch: str,
    num_classes: int,
    weights: str = "imagenet",
    s3: storage.S3Options | None = None,
) -> nn.Module:
    """A torchvision `arch` with `weights` (imagenet, random or a file) and an N-class head."""
    check_arch(arch)
    if weights == "imagenet":
        try:
            model = torchvision.models.get_model(arch, weights="IMAGENET1K_V1")
        except Exception as e:  # no cache and no network, a corrupt download, ...
            raise InsectError(
                f"could not load ImageNet weights for {arch} (torch hub cache "
                f"{torch.hub.get_dir()}/checkpoints): {e}. Pass --weights random or "
                "--weights PATH to a state-dict file"
            ) from None
    else:
        model = torchvision.models.get_model(arch, weights=None)
        if weights != "random":
            state = load_state_dict_file(weights, s3)
            check_trunk(weights, {k: tuple(v.shape) for k, v in state.items()}, arch)
            head = head_name(model) + "."
            model.load_state_dict(
                {k: v for k, v in state.items() if not k.startswith(head)}, strict=False
            )
    replace_head(model, num_classes)
    return model


def check_trunk(uri: str, found: dict[str, tuple[int, ...]], arch: str) -> None:
    """Refuse a --weights state dict (its tensors' shapes `found`) whose tensors are not
    `arch`'s, in one line naming the first few. Its head's are not looked at: the head is
    replaced, so an insect model's own weights (another number of classes) start a run."""
    model = skeleton(arch)
    head = head_name(model) + "."
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(head)}
    found = {k: v for k, v in found.items() if not k.startswith(head)}
    problems = [
        _first("missing from it", [k for k in expected if k not in found]),
        _first(f"not {arch}'s", [k for k in found if k not in expected]),
        _first(
            f"of other shapes than {arch}'s",
            [f"{k} {list(v)}, not {list(expected[k])}" for k, v in found.items()
             if k in expected and v != expected[k]],
        ),
    ]  # fmt: skip
    problems = [p for p in problems if p]
    if problems:
        raise InsectError(f"--weights {uri} does not fit {arch}: {'; '.join(problems)}")


def _first(what: str, names: list[str], shown: int = 3) -> str:
    """'N tensors WHAT (the first `shown`, ...)', or "" for none."""
    if not names:
        return ""
    more = ", ..." if len(names) > shown else ""
    return f"{console.counted(len(names), 'tensor')} {what} ({', '.join(names[:shown])}{more})"


def load_state_dict_file(uri: str, s3: storage.S3Options | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch pickle (tensors only, `weights_only`)."""
    with storage.user_errors(uri):
        data = storage.read_bytes(uri, s3)
    if uri.endswith(".safetensors"):
        try:
            return safetensors.torch.load(data)
        except Exception as e:
            raise InsectError(f"{uri} is not a valid safetensors file: {e}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InsectError(
            f"refusing to load {uri}: not a plain weights file (only tensors are accepted, "
            f"weights_only=True): {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InsectError(f"{uri} does not hold a state dict of tensors")
    return state


def save_model(uri: str, model: nn.Module, meta: ModelMeta, s3=None) -> ModelMeta:
    """Write the model directory (weights, then meta.json); returns the meta with its
    content-hash model id filled in."""
    write_weights(uri, model, meta, s3)
    write_meta(uri, meta, s3)
    return meta


def write_weights(uri: str, model: nn.Module, meta: ModelMeta, s3=None) -> None:
    """Write the weights file and seal `meta` with its hash (the model id), and versions."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = safetensors.torch.save(state)
    meta.versions = versions()
    meta.sealed(hashlib.sha256(data).hexdigest())
    storage.write_file(uri, WEIGHTS_FILE, data, s3)


def _expected_shapes(meta: ModelMeta) -> dict[str, tuple[int, ...]]:
    model = skeleton(meta.arch, len(meta.classes))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_shapes(found: dict, meta: ModelMeta, weights_uri: str) -> None:
    expected = _expected_shapes(meta)
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:3]
        raise InsectError(
            f"{weights_uri} does not match {meta.arch} with {len(meta.classes)} classes "
            f"(first differences: {wrong})"
        )


def check_weights(uri: str, meta: ModelMeta, s3: storage.S3Options | None = None) -> None:
    """Check, from its header alone, that the weights file is there and fits `meta`, so
    that a broken model directory is refused before a run changes anything."""
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    found = safetensors_shapes(weights_uri, s3)
    if found is None:
        raise InsectError(f"model directory {uri} has no {WEIGHTS_FILE}")
    _check_shapes(found, meta, weights_uri)


def safetensors_shapes(
    uri: str, s3: storage.S3Options | None = None
) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} of a safetensors file's tensors, from its header alone; None where
    there is no such file."""
    fs, path = storage.filesystem(uri, s3)
    with storage.user_errors(uri):
        try:
            with fs.open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100 * 2**20:
                    raise ValueError(f"a header of {size} bytes")
                header = json.loads(f.read(size))
            return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError, AttributeError, struct.error) as e:
            raise InsectError(f"{uri} is not a valid safetensors file: {e}") from None


def check_model_id(uri: str, meta: ModelMeta, s3: storage.S3Options | None = None) -> None:
    """Hash the weights file (streamed) against what meta.json says it is."""
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    _check_hash(weights_uri, storage.sha256(weights_uri, s3), meta)


def _check_hash(weights_uri: str, found: str, meta: ModelMeta) -> None:
    """Refuse weights whose SHA-256 `found` is not the one meta.json names (its model id,
    for a meta.json of id_version 1)."""
    expected = meta.weights_sha256 if meta.id_version >= 2 else meta.model_id
    if found[: len(expected)] != expected or not expected:
        raise InsectError(
            f"{weights_uri} is not the model meta.json describes (the weights' SHA-256 "
            f"begins {found[:16]}, meta.json says {meta.model_id or 'nothing'}"
            + (f" made of {expected[:16]}" if meta.id_version >= 2 else "")
            + "): the directory is incomplete or was changed; train it again"
        )


def load_model(uri: str, s3: storage.S3Options | None = None) -> tuple[nn.Module, ModelMeta]:
    """Rebuild a trained model from its directory (on the CPU, in eval mode). The weights
    must hash to meta.json's `model_id`: a directory whose files come from different runs
    (an interrupted --overwrite, a copied file) is refused."""
    meta = read_meta(uri, s3)
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    try:
        data = storage.read_bytes(weights_uri, s3)
    except FileNotFoundError:
        raise InsectError(f"model directory {uri} has no {WEIGHTS_FILE}") from None
    _check_hash(weights_uri, hashlib.sha256(data).hexdigest(), meta)
    try:
        state = safetensors.torch.load(data)
    except Exception as e:
        raise InsectError(f"cannot read {weights_uri}: {e}") from None
    _check_shapes({k: tuple(v.shape) for k, v in state.items()}, meta, weights_uri)
    model = skeleton(meta.arch, len(meta.classes))
    model.load_state_dict(state, assign=True)
    return model.eval(), meta
