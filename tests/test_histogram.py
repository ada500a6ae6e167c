"""Histogram relation loss: chunked soft histogram, KL loss, teacher files, k-means."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glotok.losses.histogram import (HistogramRelationLoss, _ChunkedPairHistogram, bin_centers,
                                     soft_histogram, soft_histogram_naive)
from glotok.losses.teacher import (TeacherFileError, TeacherHistogram, build_teacher, kmeans,
                                   teacher_from_codebook)

REPO = Path(__file__).resolve().parents[1]


def _hist_and_grad(fn, x: torch.Tensor, weights: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    hist = fn(x)
    (hist * weights).sum().backward()
    return hist.detach(), x.grad


def _clusters(n_per: int, centers: int, d: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.eye(d)[:centers] * 5.0
    return (means.repeat_interleave(n_per, 0) + noise * torch.randn(n_per * centers, d,
                                                                     generator=g))


def test_bin_centers_span_minus_one_to_one():
    c = bin_centers(40, dtype=torch.float64)
    assert c.shape == (40,) and c[0] == -1.0 and c[-1] == 1.0
    assert torch.allclose(c.diff(), torch.full((39,), 2.0 / 39, dtype=torch.float64))


# The gradient sums kernel slopes of neighbouring bins that nearly cancel, so one-ulp noise in
# exp (which varies between processes with memory alignment) moves the float32 reference
# gradient by up to ~4e-5 of its largest entry. Both bounds are far inside "1e-5 absolute".
_TOL = {torch.float32: (1e-6, 2e-4), torch.float64: (1e-12, 1e-10)}  # (value abs, grad rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [100, 512])
def test_chunked_matches_naive_in_value_and_gradient(dtype, chunk_size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g, dtype=dtype)
    w = torch.randn(40, generator=g, dtype=dtype)
    ref, ref_grad = _hist_and_grad(soft_histogram_naive, x, w)
    out, grad = _hist_and_grad(lambda v: soft_histogram(v, chunk_size=chunk_size), x, w)
    value_tol, grad_tol = _TOL[dtype]
    assert (out - ref).abs().max() < value_tol
    # Relative to the largest gradient entry (~1e-3 here), so the bound is a real one.
    assert (grad - ref_grad).abs().max() / ref_grad.abs().max() < grad_tol


def test_chunked_function_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(7, 3, generator=g, dtype=torch.float64), dim=1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: _ChunkedPairHistogram.apply(v, 40, 190.0, 3), (x,))


def test_bfloat16_codebook_is_histogrammed_in_float32():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    hist = soft_histogram(x, chunk_size=64)
    assert hist.dtype == torch.float32
    assert torch.allclose(hist, soft_histogram_naive(x.float()), atol=1e-6)


def _random_hist(seed: int) -> torch.Tensor:
    h = torch.rand(40, generator=torch.Generator().manual_seed(seed)) ** 3 + 1e-3
    return h / h.sum()


def test_loss_is_kl_from_teacher_to_student():
    p_t = _random_hist(1)
    loss_fn = HistogramRelationLoss(p_t, chunk_size=50)
    codebook = torch.randn(120, 8, generator=torch.Generator().manual_seed(2))
    p_s = loss_fn.student_histogram(codebook).detach()
    by_hand = (p_t * torch.log(p_t / (p_s + loss_fn.eps))).sum()
    assert torch.allclose(loss_fn(codebook), by_hand, rtol=1e-5)


def test_loss_differs_from_reverse_kl():
    p_t = _random_hist(1)
    codebook = torch.randn(120, 8, generator=torch.Generator().manual_seed(2))
    loss = HistogramRelationLoss(p_t, chunk_size=50)(codebook)
    p_s = soft_histogram(codebook).detach()
    reverse = (p_s * torch.log(p_s / p_t)).sum()
    assert (loss - reverse).abs() > 0.01 * loss.abs()


def test_loss_is_zero_when_codebook_is_the_teachers_vector_set():
    vectors = torch.randn(256, 8, generator=torch.Generator().manual_seed(3))
    teacher = build_teacher(vectors, chunk_size=100)
    loss = HistogramRelationLoss(teacher.tensor(), chunk_size=100)(vectors)
    assert loss.abs() < 1e-6


def test_gradient_reaches_only_the_codebook():
    loss_fn = HistogramRelationLoss(_random_hist(4))
    codebook = torch.nn.Parameter(torch.randn(64, 8))
    loss_fn(codebook).backward()
    assert list(loss_fn.parameters()) == []
    assert not loss_fn.teacher_hist.requires_grad and loss_fn.teacher_hist.grad is None
    assert codebook.grad is not None and codebook.grad.abs().sum() > 0


def test_gradient_descent_on_the_codebook_lowers_the_loss():
    teacher = build_teacher(_clusters(32, 4, 8, noise=1.0))
    loss_fn = HistogramRelationLoss(teacher.tensor(), chunk_size=64)
    codebook = torch.nn.Parameter(torch.randn(128, 8, generator=torch.Generator().manual_seed(5)))
    opt = torch.optim.Adam([codebook], lr=0.02)
    start = loss_fn(codebook).item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn(codebook).backward()
        opt.step()
    assert loss_fn(codebook).item() < 0.5 * start


def test_teacher_is_not_in_state_dict_and_survives_bfloat16_cast():
    p_t = _random_hist(6)
    loss_fn = HistogramRelationLoss(p_t).bfloat16()
    assert "teacher_hist" not in loss_fn.state_dict()
    assert loss_fn.teacher_hist.dtype == torch.float32
    assert torch.equal(loss_fn.teacher_hist, p_t.float())


@pytest.mark.parametrize("teacher, match", [
    (torch.full((39,), 1 / 39), "expected \\(40,\\)"),
    (torch.cat([torch.tensor([-0.1, 0.1]), torch.full((38,), 1 / 38)]), "negative"),
    (torch.full((40,), 0.05), "sums to 2"),
])
def test_loss_rejects_an_invalid_teacher(teacher, match):
    with pytest.raises(ValueError, match=match):
        HistogramRelationLoss(teacher)


def test_loss_rejects_a_codebook_that_is_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        HistogramRelationLoss(_random_hist(0))(torch.randn(4, 16, 8))


_PEAK_SCRIPT = textwrap.dedent("""
    import torch
    from glotok.losses.histogram import soft_histogram

    def peak_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    # One thread: this measures memory, and on a busy 2-core box two OpenMP threads spend
    # most of their time waiting for each other at the barrier after every op.
    torch.set_num_threads(1)
    x = torch.randn(16384, 8, requires_grad=True)
    w = torch.randn(40)
    before = peak_kb()
    (soft_histogram(x, chunk_size=1024) * w).sum().backward()
    assert torch.isfinite(x.grad).all()
    print((peak_kb() - before) / 1024)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_chunked_forward_backward_peak_memory_is_bounded_at_n16384():
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True)
    growth_mb = float(out.stdout.strip().splitlines()[-1])
    assert growth_mb < 1500, f"peak RSS grew {growth_mb:.0f} MB"


def _teacher(centroids=None) -> TeacherHistogram:
    return TeacherHistogram(histogram=_random_hist(7).double().tolist(), bins=40, alpha=190.0,
                            provenance={"source": "features", "model": "test", "k": 4},
                            centroids=centroids)


def test_teacher_roundtrip_without_centroids(tmp_path):
    t = _teacher()
    loaded = TeacherHistogram.load(t.save(tmp_path / "t.json"))
    assert loaded == t and loaded.centroids is None
    assert "centroids_file" not in json.loads((tmp_path / "t.json").read_text())


def test_teacher_roundtrip_with_centroids(tmp_path):
    cents = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    loaded = TeacherHistogram.load(_teacher(cents).save(tmp_path / "t.json"))
    assert json.loads((tmp_path / "t.json").read_text())["centroids_file"] == "t.centroids.npy"
    np.testing.assert_array_equal(loaded.centroids, cents)
    assert loaded.histogram == _teacher().histogram
    assert loaded.tensor().dtype == torch.float32


def _edit(doc: dict, **changes) -> dict:
    doc = dict(doc)
    for k, v in changes.items():
        if v is None:
            doc.pop(k)
        else:
            doc[k] = v
    return doc


@pytest.mark.parametrize("make_bad", [
    lambda d: "{not json",
    lambda d: _edit(d, histogram=None),
    lambda d: _edit(d, alpha=None),
    lambda d: _edit(d, histogram=d["histogram"][:-1]),
    lambda d: _edit(d, histogram=[-0.1, 0.1 + d["histogram"][0]] + d["histogram"][1:-1]),
    lambda d: _edit(d, histogram=[math.nan] + d["histogram"][1:]),
    lambda d: _edit(d, histogram=[2 * v for v in d["histogram"]]),
    lambda d: _edit(d, format_version=2),
    lambda d: _edit(d, centroids_file="missing.npy"),
], ids=["not-json", "no-histogram", "no-alpha", "wrong-length", "negative", "nan",
        "sum-not-1", "format-version", "missing-sidecar"])
def test_teacher_load_error_names_the_file(tmp_path, make_bad):
    path = _teacher().save(tmp_path / "t.json")
    bad = make_bad(json.loads(path.read_text()))
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(TeacherFileError, match=str(path)):
        TeacherHistogram.load(path)


def test_teacher_load_of_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.json")):
        TeacherHistogram.load(tmp_path / "nope.json")


def test_kmeans_recovers_well_separated_clusters():
    x = _clusters(50, 4, 8, noise=0.3)
    cents = kmeans(x, 4, seed=0)
    true = F.normalize(torch.eye(8)[:4], dim=1)
    assert (true @ cents.T).max(dim=1).values.min() > 0.99


def test_kmeans_is_deterministic_per_seed():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kmeans(x, 10, seed=3), kmeans(x, 10, seed=3))


def test_kmeans_returns_the_normalised_vectors_when_n_le_k():
    x = torch.randn(5, 8)
    assert torch.allclose(kmeans(x, 8), F.normalize(x, dim=1))


def test_kmeans_with_fewer_distinct_points_than_k_gives_finite_centroids():
    x = torch.randn(3, 8).repeat(10, 1)
    cents = kmeans(x, 5, seed=0)
    assert cents.shape == (5, 8) and torch.isfinite(cents).all()


def test_build_teacher_with_k_histograms_the_centroids():
    teacher = build_teacher(_clusters(100, 6, 8, noise=1.0).numpy(), k=16, keep_centroids=True,
                            provenance={"model": "unit-test"})
    assert teacher.centroids.shape == (16, 8)
    assert teacher.provenance["k"] == 16 and teacher.provenance["num_vectors"] == 600
    assert teacher.provenance["model"] == "unit-test"
    expected = soft_histogram_naive(torch.from_numpy(teacher.centroids)).double()
    assert torch.allclose(torch.tensor(teacher.histogram, dtype=torch.float64), expected, atol=1e-6)


def test_teacher_from_codebook_records_checkpoint_source():
    teacher = teacher_from_codebook(torch.randn(64, 8), provenance={"model": "ckpt/step_10"})
    assert teacher.provenance["source"] == "checkpoint" and teacher.provenance["k"] is None
