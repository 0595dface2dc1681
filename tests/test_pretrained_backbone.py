"""ImageNet weights for ResNet backbones: from a local file, by torchvision name, clear offline."""

import pytest
import torch
import torchvision

from labkit.nn.backbones import ResNet, build_backbone, detector_backbone_kwargs
from labkit.recipes import atss


@pytest.fixture
def resnet18_file(tmp_path):
    """A torchvision ResNet-18 state dict (seeded random weights standing in for ImageNet's)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_a_local_torchvision_file_loads_every_backbone_weight(resnet18_file):
    path, reference = resnet18_file
    net = ResNet(18, weights=path)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, reference[key], msg=key)
    wrapped = path.with_name("wrapped.pth")
    torch.save({"state_dict": reference}, wrapped)
    torch.testing.assert_close(ResNet(18, weights=wrapped).conv1.weight, reference["conv1.weight"])


def test_recipes_pass_the_weights_and_freeze_batchnorm_statistics(resnet18_file):
    path, reference = resnet18_file
    model = atss(5, backbone="resnet18", backbone_weights=str(path))
    torch.testing.assert_close(
        model.backbone.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"]
    )
    assert model.backbone.norm_eval and model.recipe[1]["backbone_weights"] == str(path)
    model.train()
    assert not model.backbone.bn1.training  # pretrained statistics stay frozen
    scratch = atss(5, backbone="resnet18")
    assert not scratch.backbone.norm_eval


def test_wrong_files_and_names_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights: no file at"):
        ResNet(18, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(
        ValueError, match=r"weights: ResNet-18 has torchvision weights \['IMAGENET1K_V1'\]"
    ):
        ResNet(18, weights="IMAGENET1K_V2")
    other = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match="not a ResNet-18 state dict"):
        ResNet(18, weights=other)
    with pytest.raises(ValueError, match="backbone_weights: the tiny backbone"):
        detector_backbone_kwargs("tiny", "IMAGENET1K_V1")


def test_offline_download_says_what_to_do(monkeypatch):
    def no_network(self, *args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(
        RuntimeError, match=r"could not download .*pass its path: weights='resnet50.pth'"
    ):
        build_backbone("resnet50", weights="IMAGENET1K_V2")
