"""Teacher feature extractors: the shipped ImageNet EfficientNet-Lite0 on the sample photos, and
small randomly initialised DINOv2 models (no weights are downloaded)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from glotok.data.sample import sample_photo_paths
from glotok.data.shards import center_crop_arr, decode_image
from glotok.teacher import (
    DinoV2Features,
    build_feature_extractor,
)


def _photos(n, size=256):
    """(n, 3, size, size) uint8 center crops: ImageNet photos and scikit-image ones."""
    paths = sample_photo_paths()
    picks = paths[: n // 2] + paths[20: 20 + n - n // 2]
    arrs = [np.asarray(center_crop_arr(decode_image(Path(p.path).read_bytes()), size))
            for p in picks]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def _tiny_dinov2_config(**overrides):
    from transformers import Dinov2Config

    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
                  image_size=224)
    return Dinov2Config(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def efficientnet():
    return build_feature_extractor("efficientnet_lite0")


def test_efficientnet_lite0_features_of_sample_photos(efficientnet):
    images = _photos(3)
    feats = efficientnet(images)
    # Stride-16 map of 256x256 = 16x16 positions, 4x4-pooled = 16 vectors of 112 per photo.
    assert feats.shape == (3 * 16, 112) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert torch.equal(efficientnet(images), feats)  # deterministic
    # Image-major order; float input in [-1, 1] is the same image.
    assert torch.allclose(efficientnet(images[2:].float() / 127.5 - 1), feats[32:], atol=1e-5)
    per_photo = feats.view(3, 16, 112).mean(1)
    assert torch.pdist(per_photo).min() > 0.1 * per_photo.norm(dim=1).mean()  # not degenerate


def test_efficientnet_lite0_provenance_names_model_and_layer(efficientnet):
    prov = efficientnet.provenance()
    assert "efficientnet_lite0" in prov["model"] and "stride-16" in prov["layer"]
    assert prov["pool"] == 4


def test_random_dinov2_gives_pooled_patch_tokens():
    extractor = DinoV2Features.from_config(_tiny_dinov2_config(), seed=0)
    images = _photos(3)
    feats = extractor(images)
    # 224 crop / patch 14 = 16x16 grid, pooled 4x4 -> 4x4 = 16 vectors of hidden 64 per image.
    assert feats.shape == (3 * 16, 64) and torch.isfinite(feats).all()

    # The same from the model directly: CLS dropped, patches on the grid, 4x4 means.
    x = images.float() / 127.5 - 1
    x = x[:, :, 16:240, 16:240]  # center 224 of 256
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = extractor.model(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state
    grid = tokens[:, 1:].reshape(3, 16, 16, 64)
    want = grid.reshape(3, 4, 4, 4, 4, 64).mean(dim=(2, 4)).reshape(3 * 16, 64)
    assert torch.allclose(feats, want, atol=1e-5)


def test_random_dinov2_with_registers_drops_register_tokens():
    from transformers import Dinov2WithRegistersConfig

    config = Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       patch_size=14, image_size=224, num_register_tokens=4)
    extractor = DinoV2Features.from_config(config, seed=0, pool=2)
    feats = extractor(_photos(2))
    assert feats.shape == (2 * 8 * 8, 64) and torch.isfinite(feats).all()


def test_dinov2_intermediate_layer_and_other_input_sizes():
    extractor = DinoV2Features.from_config(_tiny_dinov2_config(), seed=1, layer=1)
    assert extractor.provenance()["layer"].startswith("hidden_states[1]")
    # A 320x300 image is resized (short side 256) and center-cropped to 224 first.
    images = torch.randint(0, 256, (2, 3, 320, 300), dtype=torch.uint8)
    assert extractor(images).shape == (2 * 16, 64)


def test_dinov2_loads_from_a_local_directory(tmp_path):
    random = DinoV2Features.from_config(_tiny_dinov2_config(), seed=0)
    random.model.save_pretrained(tmp_path / "dinov2-tiny")
    loaded = build_feature_extractor("dinov2", name_or_path=tmp_path / "dinov2-tiny")
    images = _photos(1)
    assert torch.allclose(loaded(images), random(images), atol=1e-6)
    assert loaded.provenance()["model"].endswith("dinov2-tiny")


def test_unknown_extractor_is_a_clear_error():
    with pytest.raises(ValueError, match="dinov2"):
        build_feature_extractor("clip")


def test_sample_teacher_builds_from_registry_features():
    from glotok.data.sample_teacher import ensure_sample_teacher
    from glotok.losses.teacher import TeacherHistogram

    # The session cache (conftest): the trainer tests reuse this file.
    path = ensure_sample_teacher()
    teacher = TeacherHistogram.load(path)
    assert teacher.bins == 40 and abs(sum(teacher.histogram) - 1) < 1e-4
    prov = json.loads(Path(path).read_text())["provenance"]
    assert prov["images_seen"] == len(sample_photo_paths()) and prov["k"] == 128
    assert "efficientnet_lite0" in prov["model"]
