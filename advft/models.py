"""Encoders: ResNet trunks that map [0,1] images to pooled features, and the reader of their checkpoints.

Conventions
-----------
* Input to every encoder is a float batch (B, 3, H, W) with pixels in [0, 1]. Mean/std normalisation,
  when asked for, happens inside ``Encoder.forward``: eps = 8/255 then means 8/255 of pixel range,
  whatever statistics the pretrained model expects.
* Output is the global-average-pooled feature of the last stage, flattened: (B, feature_dim). There
  is no classifier and no projection head; FARE compares these pooled features.
* The trunk is a torchvision ResNet (``net``) with ``fc`` replaced by ``nn.Identity``, so its weights
  use torchvision key names (``conv1.weight``, ``layer1.0.bn1.running_mean``...). The normalisation
  statistics are non-persistent buffers: they follow ``.to(device)`` but are not in ``state_dict()``,
  whose keys are therefore exactly ``"net." + <torchvision key>``. ``encoder_state_dict`` drops the
  ``net.`` prefix; that is what advft checkpoints store, so they are plain torchvision-style state dicts.
* Checkpoints from elsewhere are untrusted: they are read with ``weights_only=True`` and only
  ``argparse.Namespace`` allowed beyond tensors and containers (the simclr-pytorch files hold one).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

ARCHS = ("resnet50", "resnet18", "tiny")
# cifar: 3x3 stride-1 conv1 (padding 1) and no max-pool; cifar_pad2: the same with padding 2, solo-learn's
# CIFAR stem (its feature maps are 34x34 for 32x32 inputs); imagenet: torchvision's 7x7 stride-2 conv1 + max-pool
STEMS = ("cifar", "cifar_pad2", "imagenet")
# Per-channel (mean, std) of the data the pretrained weights saw. "none": the model takes [0,1] pixels
# as they are (simclr-pytorch trained that way). The CIFAR-10 std is the per-pixel one (0.247...),
# not the often copied (0.2023, 0.1994, 0.2010).
NORMALIZE: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]] | None] = {
    "none": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_FEATURE_DIMS = {"resnet50": 2048, "resnet18": 512, "tiny": 128}
_TINY_WIDTHS = (16, 32, 64, 128)

# Names used in error messages, so that a refused file tells what would have been read.
_FORMATS = (
    "simclr-pytorch {'state_dict': {'convnet.*'}, 'hparams'}, "
    "solo-learn {'state_dict': {'backbone.*'}}, "
    "a torchvision ResNet state dict {'conv1.weight', ...}, "
    "advft {'format': 'advft' | 'advft-encoder', 'model': ...}"
)
# Prefixes left by wrappers around a module when someone saved the wrapper (DDP, torch.compile,
# our own Encoder): stripped from the front of every key before anything else.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")
# Heads of the SSL methods or of torchvision classifiers that sit next to the trunk and are not used.
_UNUSED_HEADS = ("fc.", "projection.", "projector.", "classifier.", "momentum_")
_SIMCLR_ARCHS = {"ResNet50": "resnet50", "resnet50": "resnet50", "resnet18": "resnet18", "ResNet18": "resnet18"}
_SIMCLR_STEMS = {"cifar": "cifar", "imagenet": "imagenet"}
# The networks solo-learn builds (stem) and the normalisation its pretraining applied to their inputs: its
# CIFAR-10 transform's mean/std are NORMALIZE["cifar10"], its ImageNet one torchvision's ("imagenet").
_SOLO_LEARN = {"cifar_pad2": "cifar10", "imagenet": "imagenet"}


class CheckpointFormatError(ValueError):
    """A checkpoint file that cannot be read, is not a format we read, or does not fit the model.

    The message is one line and names the file and the problem.
    """


class TinyResNet(nn.Module):
    """A four-stage ResNet of BasicBlocks, one block per stage, widths 16/32/64/128 (128-d features).

    Same attribute and state-dict key names as torchvision's ResNet (conv1, bn1, layer1..layer4,
    ``layerN.0.downsample.{0,1}``), so everything that reads or edits a ResNet trunk works on it too.
    It exists for tests and the CPU demo, where a ResNet-18 would be slow.
    """

    def __init__(self) -> None:
        super().__init__()
        w1, w2, w3, w4 = _TINY_WIDTHS
        self.conv1 = nn.Conv2d(3, w1, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(w1, w1, stride=1)
        self.layer2 = self._stage(w1, w2, stride=2)
        self.layer3 = self._stage(w2, w3, stride=2)
        self.layer4 = self._stage(w3, w4, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or in_ch != out_ch:
            downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        return nn.Sequential(BasicBlock(in_ch, out_ch, stride=stride, downsample=downsample))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Encoder(nn.Module):
    """[0,1] images (B, 3, H, W) -> pooled features (B, feature_dim).

    ``net`` is the ResNet trunk (torchvision key names, ``fc`` = Identity). When ``normalize`` is not
    "none", forward first computes (x - mean) / std with the statistics of ``NORMALIZE[normalize]``;
    those are non-persistent buffers, so ``state_dict()`` holds only ``net.*`` keys.
    """

    feature_dim: int
    arch: str
    stem: str
    normalize: str

    def __init__(self, net: nn.Module, feature_dim: int, arch: str, stem: str, normalize: str) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = feature_dim
        self.arch = arch
        self.stem = stem
        self.normalize = normalize
        stats = NORMALIZE[normalize]
        mean = None if stats is None else torch.tensor(stats[0]).view(1, 3, 1, 1)
        std = None if stats is None else torch.tensor(stats[1]).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.net(x)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, stem={self.stem}, normalize={self.normalize}, feature_dim={self.feature_dim}"


def _check_choice(name: str, value: str, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


def build_encoder(arch: str = "resnet50", stem: str = "cifar", normalize: str = "none") -> Encoder:
    """A freshly initialised encoder (train mode).

    arch: "resnet50" (2048-d), "resnet18" (512-d) or "tiny" (128-d). stem: "imagenet" is torchvision's
    7x7 stride-2 conv1 followed by a max-pool; "cifar" is a 3x3 stride-1 conv1 (padding 1, no bias) and
    no max-pool, so 32x32 inputs keep their resolution until layer2; "cifar_pad2" pads that conv1 by 2
    (solo-learn's CIFAR networks). normalize: a key of NORMALIZE.
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice("stem", stem, STEMS)
    _check_choice("normalize", normalize, NORMALIZE)
    if arch == "tiny":
        net: nn.Module = TinyResNet()
    else:
        net = getattr(torchvision.models, arch)(weights=None)
        net.fc = nn.Identity()
    if stem in ("cifar", "cifar_pad2"):
        width = net.conv1.out_channels
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=2 if stem == "cifar_pad2" else 1, bias=False)
        # Same init as torchvision gives its own convolutions, rather than nn.Conv2d's default.
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return Encoder(net, _FEATURE_DIMS[arch], arch, stem, normalize)


def encoder_state_dict(encoder: Encoder) -> dict[str, Tensor]:
    """The trunk weights as advft checkpoints store them: torchvision key names, no ``net.`` prefix.

    The tensors share storage with the model (as ``state_dict()`` does); save or clone them before
    the next optimiser step if a snapshot is wanted. Pass the plain module, not a DDP or compiled wrapper.
    """
    if not isinstance(encoder, Encoder):
        raise TypeError(
            f"encoder_state_dict expects an advft Encoder, got {type(encoder).__name__}; "
            "unwrap DDP (.module) or torch.compile (._orig_mod) first"
        )
    return dict(encoder.net.state_dict())


def _safe_load(path: Path) -> Any:
    """torch.load without executing the file: tensors, containers and argparse.Namespace only."""
    if not path.exists():
        raise CheckpointFormatError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: not a regular file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            needs = f"needs {found.group(1)} to unpickle" if found else "needs objects beyond tensors to unpickle"
            raise CheckpointFormatError(
                f"{path}: refused without running it: the file {needs}, which could execute code; "
                f"formats read: {_FORMATS}. If you trust the file, re-save just its tensors "
                "(torch.save({'state_dict': ckpt['state_dict']}, new_path))"
            ) from None
        raise CheckpointFormatError(f"{path}: damaged or not a torch checkpoint ({_one_line(e)})") from e
    except Exception as e:  # truncated zip, EOF, foreign bytes: all mean "cannot be read"
        raise CheckpointFormatError(f"{path}: damaged or not a torch checkpoint ({_one_line(e)})") from e


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _tensor_dict(path: Path, what: str, obj: Any) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointFormatError(f"{path}: {what} is not a dict of str -> tensor")
    return {_strip_wrappers(k): v for k, v in obj.items()}


def _under(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix``, prefix removed; the rest are the method's heads and are ignored."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _extract_trunk(path: Path, obj: Any) -> tuple[str, dict[str, Tensor], dict[str, str]]:
    """(format name, trunk state dict with torchvision keys, what the file declares about arch/stem)."""
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a dict; formats read: {_FORMATS}")
    if "format" in obj:
        fmt = obj["format"]
        if fmt not in ("advft", "advft-encoder"):
            raise CheckpointFormatError(f"{path}: unknown format {fmt!r}; formats read: {_FORMATS}")
        if "model" not in obj:
            raise CheckpointFormatError(f"{path}: an {fmt} file without a 'model' entry")
        declared = {k: obj[k] for k in ("arch", "stem", "normalize") if isinstance(obj.get(k), str)}
        return fmt, _tensor_dict(path, "'model'", obj["model"]), declared
    if isinstance(obj.get("state_dict"), dict):
        sd = _tensor_dict(path, "'state_dict'", obj["state_dict"])
        if any(k.startswith("convnet.") for k in sd):
            hp = obj.get("hparams")
            declared = {}
            if getattr(hp, "arch", None) in _SIMCLR_ARCHS:
                declared["arch"] = _SIMCLR_ARCHS[hp.arch]
            if getattr(hp, "data", None) in _SIMCLR_STEMS:
                declared["stem"] = _SIMCLR_STEMS[hp.data]
            return "simclr-pytorch", _under(sd, "convnet."), declared
        if any(k.startswith("backbone.") for k in sd):
            return "solo-learn", _under(sd, "backbone."), {}
        found = sorted({k.split(".")[0] for k in sd})[:6]
        raise CheckpointFormatError(
            f"{path}: 'state_dict' has neither 'convnet.*' nor 'backbone.*' keys (found prefixes {found}); "
            f"formats read: {_FORMATS}"
        )
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return "torchvision", _tensor_dict(path, "the state dict", obj), {}
    raise CheckpointFormatError(
        f"{path}: unknown checkpoint layout (top-level keys {sorted(map(str, obj))[:8]}); formats read: {_FORMATS}"
    )


def _guess(sd: dict[str, Tensor]) -> str:
    """A hint for error messages: which arch/stem the file's tensors look like."""
    conv1 = sd.get("conv1.weight")
    if any(".conv3." in k for k in sd):
        arch = "resnet50"
    elif conv1 is not None and conv1.shape[0] == _TINY_WIDTHS[0]:
        arch = "tiny"
    elif "layer1.1.conv1.weight" in sd:
        arch = "resnet18"
    else:
        arch = "unknown"
    stem = "unknown"
    if conv1 is not None and conv1.dim() == 4:
        stem = {3: "cifar or cifar_pad2", 7: "imagenet"}.get(conv1.shape[-1], "unknown")
    return f"the file looks like arch={arch}, stem={stem}"


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > n else ''})"


def _check_fit(path: Path, fmt: str, sd: dict[str, Tensor], encoder: Encoder) -> dict[str, Tensor]:
    """Strict match of the file's trunk against the model; returns the dict to load."""
    sd = {k: v for k, v in sd.items() if not k.startswith(_UNUSED_HEADS)}
    own = encoder.net.state_dict()
    # BatchNorm's batch counter is absent from very old files and unused with a fixed momentum.
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    target = f"a {encoder.arch} encoder with the {encoder.stem} stem"
    if missing or unexpected:
        listed = [f"{name} {_examples(ks)}" for name, ks in (("missing", missing), ("unexpected", unexpected)) if ks]
        raise CheckpointFormatError(f"{path}: {fmt} weights do not fit {target}: {', '.join(listed)}; {_guess(sd)}")
    for k, v in own.items():
        if k in sd and sd[k].shape != v.shape:
            raise CheckpointFormatError(
                f"{path}: {fmt} weights do not fit {target}: {k} has shape {tuple(sd[k].shape)} in the file, "
                f"{tuple(v.shape)} in the model; {_guess(sd)}"
            )
    return {k: sd.get(k, v) for k, v in own.items()}


def load_encoder(
    path: str | os.PathLike, arch: str = "resnet50", stem: str = "cifar", normalize: str = "none"
) -> Encoder:
    """An encoder with the trunk weights of a checkpoint file, in eval mode.

    The file's format is detected: simclr-pytorch (``convnet.*`` under 'state_dict'), solo-learn
    (``backbone.*``), a bare torchvision ResNet state dict (``fc.*`` dropped), or advft's own
    checkpoints ({'format': 'advft', 'model': ...}, other entries ignored) and exported encoders
    ({'format': 'advft-encoder', 'model': ..., 'arch', 'stem'}). Keys are matched strictly after the
    prefix is stripped and unused heads dropped. arch/stem/normalize describe the model to build
    (the file holds only weights); where the file declares its arch or stem, they must agree. A
    solo-learn file must be asked for as the network solo-learn trained: stem "cifar_pad2" with
    normalize "cifar10", or stem "imagenet" with normalize "imagenet"; anything else is refused.
    Raises CheckpointFormatError for every file that cannot be read, is refused, or does not fit.
    """
    path = Path(path)
    encoder = build_encoder(arch, stem, normalize)
    fmt, sd, declared = _extract_trunk(path, _safe_load(path))
    requested = {"arch": arch, "stem": stem, "normalize": normalize}
    for field, value in declared.items():
        if value != requested[field]:
            raise CheckpointFormatError(
                f"{path}: the {fmt} file declares {field}={value!r} but {field}={requested[field]!r} was requested"
            )
    if fmt == "solo-learn":
        _check_solo_learn(path, stem, normalize)
    encoder.net.load_state_dict(_check_fit(path, fmt, sd, encoder), strict=True)
    return encoder.eval()


def _check_solo_learn(path: Path, stem: str, normalize: str) -> None:
    """The weights of a solo-learn file fit other stems too (padding is not a weight): refuse every model
    but the one solo-learn trained, since any other computes other features."""
    if stem not in _SOLO_LEARN:
        raise CheckpointFormatError(
            f"{path}: a solo-learn file holds solo-learn's network: set model.stem = 'cifar_pad2' (its CIFAR "
            f"conv1, 3x3 stride 1 padding 2, no max-pool) or 'imagenet', not {stem!r}"
        )
    if normalize != _SOLO_LEARN[stem]:
        raise CheckpointFormatError(
            f"{path}: solo-learn trained its {stem} network on inputs normalised with NORMALIZE"
            f"[{_SOLO_LEARN[stem]!r}]: set model.normalize = '{_SOLO_LEARN[stem]}', not {normalize!r}"
        )


def load_head(path: str | os.PathLike, in_dim: int | None = None) -> nn.Linear:
    """A linear classifier from {'state_dict': {'weight', 'bias'}} or a bare {'weight', 'bias'} file.

    weight is (num_classes, in_dim), bias (num_classes,). When in_dim is given it must match the file.
    """
    path = Path(path)
    obj = _safe_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or set(obj) != {"weight", "bias"}:
        keys = sorted(map(str, obj))[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointFormatError(
            f"{path}: a linear head file holds exactly 'weight' and 'bias' "
            f"(optionally under 'state_dict'), found {keys}"
        )
    weight, bias = obj["weight"], obj["bias"]
    well_formed = isinstance(weight, Tensor) and isinstance(bias, Tensor) and weight.dim() == 2
    if not (well_formed and bias.shape == weight.shape[:1]):
        raise CheckpointFormatError(f"{path}: head weight must be (classes, in_dim) and bias (classes,)")
    if in_dim is not None and weight.shape[1] != in_dim:
        raise CheckpointFormatError(f"{path}: head expects {weight.shape[1]}-d features, the encoder gives {in_dim}-d")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head
