"""Backbones: the EfficientNet-Lite0 weights are real ImageNet weights (they recognise real photos),
torchvision backbones build by name without any download, unknown names fail clearly."""
import pytest
import torch
from PIL import Image

from captioner.config import PreprocessConfig
from captioner.encoder import BackboneUnavailable, build_backbone, encoder_digest, lite_classifier, split_for_top_tuning
from captioner.preprocess import preprocess

skdata = pytest.importorskip("skimage.data", reason="scikit-image (the dev extra) ships the photos")

CATS = set(range(281, 286))          # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968
ROCKETS = {657, 744, 812}            # missile, projectile, space shuttle


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", pretrained=True)


@pytest.fixture(scope="module")
def classifier():
    return lite_classifier("efficientnet_lite0")


def photo(name: str, cfg: PreprocessConfig) -> torch.Tensor:
    return preprocess(Image.fromarray(getattr(skdata, name)()), cfg)[None]    # (1, 3, S, S)


@pytest.mark.parametrize("name, wanted", [
    ("chelsea", CATS), ("coffee", {ESPRESSO, CUP}), ("rocket", ROCKETS)])
def test_lite0_weights_recognise_real_photos(classifier, lite0, name, wanted):
    with torch.no_grad():
        top5 = set(classifier(photo(name, lite0.preprocess)).topk(5).indices[0].tolist())
    assert top5 & wanted, f"{name}: top-5 ImageNet classes {sorted(top5)}"


def test_lite0_features_are_the_classifiers_pooled_features(classifier, lite0):
    """The captioner sees exactly what the ImageNet head saw: pooled features -> _fc == logits."""
    x = photo("chelsea", lite0.preprocess)
    with torch.no_grad():
        features = lite0.module(x)                                  # (1, 1280)
        assert features.shape == (1, 1280)
        assert torch.allclose(classifier._fc(features), classifier(x), atol=1e-4)


def test_lite0_backbone_description(lite0):
    assert lite0.feature_dim == 1280
    assert lite0.preprocess == PreprocessConfig(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert not lite0.module.training
    with torch.no_grad():
        assert lite0.module(torch.zeros(3, 3, 224, 224)).shape == (3, 1280)


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test instead of reaching for the network."""
    import torch.hub
    import torchvision.models._api as api

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(api, "load_state_dict_from_url", refuse)


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("mobilenet_v3_small", 576)])
def test_torchvision_backbone_by_name(no_downloads, name, dim):
    backbone = build_backbone(name, pretrained=False)
    assert backbone.feature_dim == dim
    assert backbone.preprocess.mean == (0.485, 0.456, 0.406)
    with torch.no_grad():
        assert backbone.module(torch.rand(2, 3, 64, 64)).shape == (2, dim)


def test_lite0_never_downloads(no_downloads):
    assert build_backbone("efficientnet_lite0", pretrained=True).feature_dim == 1280


@pytest.mark.parametrize("name", ["resnet9000", "fasterrcnn_resnet50_fpn", ""])
def test_unknown_backbone_is_a_clear_error(no_downloads, name):
    with pytest.raises(BackboneUnavailable, match=f"unknown backbone '{name}'.*classification model"):
        build_backbone(name, pretrained=False)


def test_failed_weight_download_is_a_clear_error(monkeypatch):
    import urllib.error

    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneUnavailable, match="could not get the pretrained weights of resnet18"):
        build_backbone("resnet18", pretrained=True)


@pytest.mark.parametrize("top_blocks, shape", [(1, (192, 7, 7)), (6, (112, 14, 14))])
def test_top_fine_tuning_split_is_the_same_cnn_and_the_bottom_ignores_the_top(top_blocks, shape):
    backbone = build_backbone("efficientnet_lite0", pretrained=True)
    bottom, top = split_for_top_tuning(backbone.module, top_blocks, 224)
    assert top.activation_shape == shape
    image = photo("chelsea", backbone.preprocess)
    with torch.no_grad():
        assert bottom(image).shape == (1, shape[0] * shape[1] * shape[2])
        assert torch.equal(top(bottom(image)), backbone.module(image))
        before = encoder_digest(bottom)
        top.head[0].weight.add_(1.0)              # training the top: the cache key must not move
        assert encoder_digest(bottom) == before
        assert not torch.equal(top(bottom(image)), build_backbone("efficientnet_lite0").module(image))


@pytest.mark.parametrize("name, blocks, message", [
    ("efficientnet_lite0", 0, "give 1 to 16"), ("efficientnet_lite0", 17, "give 1 to 16"),
    ("resnet18", 1, "EfficientNet-Lite")])
def test_top_fine_tuning_of_an_impossible_split_is_a_clear_error(no_downloads, name, blocks, message):
    with pytest.raises(ValueError, match=message):
        split_for_top_tuning(build_backbone(name, pretrained=False).module, blocks, 224)
