"""Encoders and their checkpoints: output shapes, stems, normalisation inside forward, and every file
format load_encoder reads, each checked against an independently built torchvision reference."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from advft.models import (
    NORMALIZE,
    CheckpointFormatError,
    Encoder,
    build_encoder,
    encoder_state_dict,
    load_encoder,
    load_head,
)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise_bn_stats(model: nn.Module, seed: int = 0) -> None:
    """Random running statistics and affine parameters, so that a loader dropping BN buffers shows."""
    g = _seeded(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _reference_resnet18_cifar() -> nn.Module:
    """A torchvision resnet18 given a CIFAR stem by hand (not through advft), with an fc head."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    _randomise_bn_stats(net)
    return net.eval()


def _embed_reference(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fc, net.fc = net.fc, nn.Identity()
    try:
        with torch.no_grad():
            return net(x)
    finally:
        net.fc = fc


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=_seeded(seed))


@pytest.fixture(scope="module")
def reference() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    net = _reference_resnet18_cifar()
    x = _images()
    return net, x, _embed_reference(net, x)


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("arch", "stem", "size", "dim"),
    [("resnet50", "imagenet", 64, 2048), ("resnet18", "cifar", 32, 512), ("tiny", "cifar", 32, 128),
     ("tiny", "imagenet", 64, 128)],
)
def test_output_is_pooled_feature_of_the_documented_size(arch: str, stem: str, size: int, dim: int) -> None:
    enc = build_encoder(arch, stem).eval()
    with torch.no_grad():
        out = enc(_images(2, size))
    assert out.shape == (2, dim)
    assert enc.feature_dim == dim and enc.arch == arch and enc.stem == stem


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_cifar_stem_keeps_resolution_through_conv1(arch: str) -> None:
    net = build_encoder(arch, "cifar").net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.padding == (1, 1)
    assert net.conv1.bias is None
    assert isinstance(net.maxpool, nn.Identity)
    seen: dict[str, torch.Size] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        seen["layer1_in"] = inputs[0].shape

    net.layer1.register_forward_hook(record)
    with torch.no_grad():
        net.eval()(_images(1, 32))
    assert seen["layer1_in"][-2:] == (32, 32)


def test_imagenet_stem_is_torchvision_default() -> None:
    net = build_encoder("tiny", "imagenet").net
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert isinstance(net.maxpool, nn.MaxPool2d)


def test_state_dict_keys_are_the_torchvision_trunk_only() -> None:
    enc = build_encoder("resnet18", "cifar", normalize="imagenet")
    tv_keys = {k for k in torchvision.models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(enc.state_dict()) == {"net." + k for k in tv_keys}
    assert set(encoder_state_dict(enc)) == tv_keys


def test_tiny_uses_torchvision_key_names_and_widths() -> None:
    sd = encoder_state_dict(build_encoder("tiny", "cifar"))
    assert sd["conv1.weight"].shape == (16, 3, 3, 3)
    assert sd["layer1.0.conv1.weight"].shape == (16, 16, 3, 3)
    assert sd["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert sd["layer4.0.bn2.running_mean"].shape == (128,)
    assert not any(k.startswith("layer1.1.") for k in sd)  # one block per stage


def test_build_rejects_unknown_choices() -> None:
    with pytest.raises(ValueError, match="arch='resnet34'"):
        build_encoder("resnet34")
    with pytest.raises(ValueError, match="normalize"):
        build_encoder("tiny", normalize="mnist")


def test_encoder_state_dict_refuses_wrappers() -> None:
    with pytest.raises(TypeError, match="unwrap"):
        encoder_state_dict(nn.Sequential(build_encoder("tiny")))  # type: ignore[arg-type]


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("normalize", ["imagenet", "cifar10"])
def test_normalisation_happens_inside_forward(normalize: str) -> None:
    plain = build_encoder("tiny", "cifar", normalize="none")
    _randomise_bn_stats(plain)
    normed = build_encoder("tiny", "cifar", normalize=normalize)
    normed.load_state_dict(plain.state_dict())
    plain.eval(), normed.eval()
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in NORMALIZE[normalize])
    x = _images()
    with torch.no_grad():
        expected = plain((x - mean) / std)
        got = normed(x)
        unnormalised = plain(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, unnormalised, atol=1e-3)  # the statistics do change the output


def test_normalisation_buffers_follow_dtype_but_are_not_saved() -> None:
    enc = build_encoder("tiny", "cifar", normalize="imagenet").to(torch.float64)
    assert enc.mean.dtype == torch.float64 and enc.std.dtype == torch.float64
    assert not any(k in ("mean", "std") for k in enc.state_dict())


# ---------------------------------------------------------------- file formats


def _simclr_file(net: nn.Module, path: Path, **hparams: str) -> Path:
    sd = {"convnet." + k: v for k, v in net.state_dict().items()}  # includes the unused convnet.fc.*
    projection = nn.Sequential(nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
                               nn.Linear(512, 128, bias=False), nn.BatchNorm1d(128))
    sd.update({"projection." + k: v for k, v in projection.state_dict().items()})
    hp = argparse.Namespace(arch="resnet18", data="cifar", temperature=0.5, batch_size=256, aug=True)
    for k, v in hparams.items():
        setattr(hp, k, v)
    torch.save({"state_dict": sd, "hparams": hp}, path)
    return path


def _solo_file(net: nn.Module, path: Path) -> Path:
    trunk = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    sd = {"backbone." + k: v for k, v in trunk.items()}
    sd.update({"momentum_backbone." + k: v + 1 for k, v in trunk.items()})
    sd.update({"projector.0.weight": torch.randn(64, 512), "classifier.weight": torch.randn(10, 512),
               "classifier.bias": torch.zeros(10), "predictor.0.weight": torch.randn(64, 64)})
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.1.0"}, path)
    return path


def _torchvision_file(net: nn.Module, path: Path) -> Path:
    torch.save(net.state_dict(), path)  # with fc.weight / fc.bias, which the loader drops
    return path


def _advft_file(net: nn.Module, path: Path) -> Path:
    """A training checkpoint written from an advft Encoder that was itself loaded from torchvision."""
    enc = load_encoder(_torchvision_file(net, path.with_suffix(".tv")), "resnet18", "cifar")
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-4, betas=(0.9, 0.95))
    torch.save({"format": "advft", "model": encoder_state_dict(enc), "optimizer": opt.state_dict(), "step": 7,
                "config": {"alpha": 0.1, "lr": 1e-4}, "rng": torch.get_rng_state()}, path)
    return path


def _advft_encoder_file(net: nn.Module, path: Path) -> Path:
    model = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    torch.save({"format": "advft-encoder", "model": model, "arch": "resnet18", "stem": "cifar"}, path)
    return path


@pytest.mark.parametrize("writer", [_simclr_file, _torchvision_file, _advft_file, _advft_encoder_file])
def test_each_format_loads_to_the_reference_embedding(writer, reference, tmp_path: Path) -> None:
    net, x, expected = reference
    enc = load_encoder(writer(net, tmp_path / "ckpt.pt"), "resnet18", "cifar")
    assert not enc.training  # loaded weights describe a fixed function: eval mode
    with torch.no_grad():
        torch.testing.assert_close(enc(x), expected)


def _solo_learn_reference(stem: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, network solo-learn evaluates) built by hand as solo-learn builds it: a torchvision resnet18,
    for CIFAR conv1 = Conv2d(3, 64, 3, stride 1, padding 2, no bias) and no max-pool; inputs normalised by
    its pretraining transform's mean/std (CIFAR-10 or ImageNet), written out here, not taken from advft."""
    torch.manual_seed(2)
    net = torchvision.models.resnet18(weights=None)
    if stem == "cifar_pad2":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        net.maxpool = nn.Identity()
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    else:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    net.fc = nn.Identity()
    _randomise_bn_stats(net, seed=3)
    norm = torchvision.transforms.Normalize(mean, std)
    return net, nn.Sequential(norm, net).eval()


@pytest.mark.parametrize(("stem", "normalize", "size"), [("cifar_pad2", "cifar10", 32), ("imagenet", "imagenet", 64)])
def test_solo_learn_file_loads_as_solo_learns_network_exactly(stem, normalize, size, tmp_path: Path) -> None:
    trunk, original = _solo_learn_reference(stem)
    enc = load_encoder(_solo_file(trunk, tmp_path / "solo.pt"), "resnet18", stem, normalize)
    if stem == "cifar_pad2":
        assert enc.net.conv1.padding == (2, 2) and isinstance(enc.net.maxpool, nn.Identity)
    x = _images(size=size)
    with torch.no_grad():
        assert torch.equal(enc(x), original(x))  # the same network: equal, not close


@pytest.mark.parametrize(("stem", "normalize", "says"), [
    ("cifar", "cifar10", "set model.stem = 'cifar_pad2'"),  # padding 1: another network with the same weights
    ("cifar_pad2", "none", "set model.normalize = 'cifar10', not 'none'"),
    ("cifar_pad2", "imagenet", "set model.normalize = 'cifar10', not 'imagenet'"),
])
def test_solo_learn_file_as_another_network_is_refused(stem, normalize, says, tmp_path: Path) -> None:
    trunk, _ = _solo_learn_reference("cifar_pad2")
    with pytest.raises(CheckpointFormatError, match=says) as e:
        load_encoder(_solo_file(trunk, tmp_path / "solo.pt"), "resnet18", stem, normalize)
    assert "\n" not in str(e.value)


def test_wrapper_prefixes_are_stripped(reference, tmp_path: Path) -> None:
    net, x, expected = reference
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "ddp.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(tmp_path / "ddp.pt", "resnet18", "cifar")(x), expected)


def test_advft_round_trip_keeps_normalised_encoder(tmp_path: Path) -> None:
    enc = build_encoder("tiny", "cifar", normalize="cifar10")
    _randomise_bn_stats(enc)
    torch.save({"format": "advft", "model": encoder_state_dict(enc), "step": 1}, tmp_path / "a.pt")
    back = load_encoder(tmp_path / "a.pt", "tiny", "cifar", normalize="cifar10")
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(back(x), enc.eval()(x))


# ---------------------------------------------------------------- errors


def _load_error(path: Path, *args: str) -> str:
    with pytest.raises(CheckpointFormatError) as info:
        load_encoder(path, *args)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_resnet18_file_loaded_as_resnet50_lists_missing_keys(reference, tmp_path: Path) -> None:
    message = _load_error(_torchvision_file(reference[0], tmp_path / "r18.pt"), "resnet50", "cifar")
    assert "missing" in message and "layer1.0.conv3.weight" in message
    assert "arch=resnet18" in message


def test_resnet18_file_loaded_as_tiny_lists_unexpected_keys(reference, tmp_path: Path) -> None:
    message = _load_error(_torchvision_file(reference[0], tmp_path / "r18.pt"), "tiny", "cifar")
    assert "unexpected" in message and "layer1.1." in message


def test_shape_mismatch_names_key_and_both_shapes(tmp_path: Path) -> None:
    imagenet_stem = build_encoder("tiny", "imagenet")
    torch.save(encoder_state_dict(imagenet_stem), tmp_path / "tiny_in.pt")
    message = _load_error(tmp_path / "tiny_in.pt", "tiny", "cifar")
    assert "conv1.weight" in message and "(16, 3, 7, 7)" in message and "(16, 3, 3, 3)" in message
    assert "stem=imagenet" in message


def test_declared_arch_or_stem_must_agree(reference, tmp_path: Path) -> None:
    message = _load_error(_advft_encoder_file(reference[0], tmp_path / "e.pt"), "tiny", "cifar")
    assert "'resnet18'" in message and "'tiny'" in message
    simclr = _simclr_file(reference[0], tmp_path / "s.pt", data="imagenet")
    message = _load_error(simclr, "resnet18", "cifar")
    assert "'imagenet'" in message and "'cifar'" in message


@pytest.mark.parametrize(
    "content",
    [{"weights": {"conv1.weight": torch.zeros(1)}, "epoch": 1},
     {"state_dict": {"encoder.conv1.weight": torch.zeros(1)}},
     {"format": "timm", "model": {}},
     torch.zeros(3)],
)
def test_unknown_layout_names_the_formats_we_read(content, tmp_path: Path) -> None:
    torch.save(content, tmp_path / "odd.pt")
    message = _load_error(tmp_path / "odd.pt", "tiny", "cifar")
    assert "simclr-pytorch" in message and "solo-learn" in message and "torchvision" in message


def test_missing_path_is_named(tmp_path: Path) -> None:
    assert "no such file" in _load_error(tmp_path / "nowhere.pt", "tiny", "cifar")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file_is_a_format_error(legacy: bool, tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save(encoder_state_dict(build_encoder("tiny", "cifar")), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "damaged" in _load_error(path, "tiny", "cifar")


class _CreatesMarker:
    """Unpickling this object creates a directory: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.pt", tmp_path / "marker"
    torch.save({"state_dict": {"convnet.conv1.weight": _CreatesMarker(marker)}}, path)
    message = _load_error(path, "tiny", "cifar")
    assert not marker.exists()
    assert "posix.mkdir" in message and "simclr-pytorch" in message
    # The file really is malicious: an unsafe load runs it. Without this the test could pass vacuously.
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------- linear heads


@pytest.mark.parametrize("wrapped", [True, False])
def test_head_round_trip(wrapped: bool, tmp_path: Path) -> None:
    head = nn.Linear(128, 10)
    sd = head.state_dict()
    torch.save({"state_dict": sd} if wrapped else sd, tmp_path / "head.pt")
    back = load_head(tmp_path / "head.pt", in_dim=128)
    h = torch.randn(5, 128, generator=_seeded(0))
    with torch.no_grad():
        torch.testing.assert_close(back(h), head(h))


def test_head_with_wrong_in_dim_or_keys_is_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(512, 10).state_dict(), tmp_path / "head.pt")
    with pytest.raises(CheckpointFormatError, match="512-d.*2048-d"):
        load_head(tmp_path / "head.pt", in_dim=2048)
    torch.save({"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointFormatError, match="'weight' and 'bias'"):
        load_head(tmp_path / "other.pt")
