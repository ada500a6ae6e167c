"""Configs: composition, overrides, and errors that name the key before any compute."""

from __future__ import annotations

import subprocess
import sys

import pytest

from glotok.config import ConfigError, load_config
from glotok.losses.teacher import TeacherHistogram


@pytest.mark.parametrize("name,sem,vis", [("glotok-b", 4096, 12288), ("glotok-2x", 16384, 16384),
                                          ("sample", 256, 512)])
def test_shipped_configs_load_with_their_codebook_sizes(repo, tmp_path, name, sem, vis):
    overrides = [] if name == "sample" else paper_files(tmp_path)
    cfg = load_config(repo / f"configs/tokenizer/{name}.yaml", overrides)
    assert (cfg.model.semantic_codebook_size, cfg.model.visual_codebook_size) == (sem, vis)


def paper_files(tmp_path) -> list[str]:
    """The files a cluster user provides for the paper configs: a teacher histogram (any valid
    one) and the LPIPS weight files (validation checks that they exist)."""
    TeacherHistogram(histogram=[1 / 40] * 40, bins=40, alpha=190.0, provenance={}).save(
        tmp_path / "t.json")
    (tmp_path / "vgg16.pth").write_bytes(b"")
    (tmp_path / "vgg.pth").write_bytes(b"")
    return [f"loss.hist.teacher={tmp_path / 't.json'}",
            f"loss.perceptual.vgg_path={tmp_path / 'vgg16.pth'}",
            f"loss.perceptual.lin_path={tmp_path / 'vgg.pth'}"]


def test_paper_config_follows_the_recipe(repo, tmp_path):
    cfg = load_config(repo / "configs/tokenizer/glotok-b.yaml", paper_files(tmp_path))
    lo = cfg.loss
    assert (lo.rec_weight, lo.perceptual_weight, lo.gan_weight, lo.codebook_weight) == (1, 1, 0.5, 1)
    assert (lo.commit_beta, lo.residual_weight, lo.hist_weight, lo.gan_start_step) == (0.25, 0.5, 0.01, 20000)
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.lr == 2e-4 and cfg.optim.grad_clip == 1.0


def test_override_changes_a_value(repo):
    cfg = load_config(repo / "configs/tokenizer/sample.yaml", ["train.max_steps=7", "data.batch_size=3"])
    assert cfg.train.max_steps == 7 and cfg.data.batch_size == 3


def test_unknown_key_in_override_is_named(repo):
    with pytest.raises(ConfigError, match=r"train\.max_stpes"):
        load_config(repo / "configs/tokenizer/sample.yaml", ["train.max_stpes=7"])


def test_unknown_key_in_yaml_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  codebok_dim: 8\n")
    with pytest.raises(ConfigError, match=r"model\.codebok_dim"):
        load_config(tmp_path / "c.yaml", ["loss.hist_weight=0"])


def test_wrong_type_is_named(repo):
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(repo / "configs/tokenizer/sample.yaml", ["train.max_steps=lots"])


@pytest.mark.parametrize("override,key", [
    ("model.image_size=60", "model.image_size"),
    ("model.adapter_width=66", "model.adapter_width"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("train.precision=fp16", "train.precision"),
    ("loss.perceptual.backbone=none", "loss.perceptual_weight"),
    ("loss.hist.teacher=/nonexistent/teacher.json", "loss.hist.teacher"),
    ("loss.hist.teacher=null", "loss.hist.teacher"),
    ("loss.hist.bins=32", "loss.hist.bins"),
])
def test_inconsistent_settings_fail_naming_the_key(repo, tmp_path, override, key):
    if override.startswith("loss.hist.bins"):
        t = TeacherHistogram(histogram=[1 / 40] * 40, bins=40, alpha=190.0, provenance={})
        t.save(tmp_path / "t.json")
        extra = [f"loss.hist.teacher={tmp_path / 't.json'}"]
    else:
        extra = []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(repo / "configs/tokenizer/sample.yaml", extra + [override])


def test_malformed_override_is_explained(repo):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(repo / "configs/tokenizer/sample.yaml", ["train.max_steps"])


def test_inherit_takes_the_base_file(repo, tmp_path):
    (tmp_path / "child.yaml").write_text(
        f"inherit: {repo / 'configs/tokenizer/sample.yaml'}\nmodel:\n  visual_codebook_size: 64\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.model.visual_codebook_size == 64 and cfg.model.image_size == 64


def test_cli_rejects_bad_config_before_compute(repo):
    # The CLI must fail fast with the key in the message and a non-zero exit, not a traceback.
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "train",
                        str(repo / "configs/tokenizer/sample.yaml"), "model.ch_multt=[1,2]"],
                       capture_output=True, text=True, cwd=repo, timeout=120)
    assert r.returncode == 2
    assert "model.ch_multt" in r.stderr and "Traceback" not in r.stderr


def test_lpips_without_weights_fails_before_compute_with_the_ways_out(repo, tmp_path):
    # No VGG16 file is given and torchvision is not installed here: nothing may be downloaded.
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: its weights count as present")
    with pytest.raises(ConfigError, match=r"loss\.perceptual\.vgg_path.*efficientnet_lite0"):
        load_config(repo / "configs/tokenizer/sample.yaml", ["loss.perceptual.backbone=lpips_vgg"])


@pytest.mark.parametrize("value", ["true", "True", "false", "auto"])
def test_use_gpu_accepts_yaml_booleans(repo, value):
    cfg = load_config(repo / "configs/tokenizer/sample.yaml", [f"cluster.use_gpu={value}"])
    assert str(cfg.cluster.use_gpu).lower() == value.lower()
