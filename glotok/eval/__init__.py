"""Evaluation library: FID/IS/precision/recall on the TF Inception, reconstruction metrics,
codebook statistics and latent uniformity. Every accumulator merges exactly across ranks and
workers; ``tools/evaluate.py`` drives them.

- ``glotok.eval.inception``: ``InceptionFeatures`` (pool3), Inception Score.
- ``glotok.eval.fid``: ``GaussianStats``, ``frechet_distance``, reference statistics files, the
  ADM reference batch.
- ``glotok.eval.metrics``: PSNR, SSIM, ``ScalarMean``, ``CodeCounter``, ``precision_recall``.
- ``glotok.eval.uniformity``: VA-VAE's uniformity metrics (``LatentSample``,
  ``latent_uniformity``).

scipy and scikit-learn are imported only by the functions that need them.
"""

from glotok.eval.fid import (
    ADM_REFERENCE_SHA256,
    AdmReferenceBatch,
    GaussianStats,
    ReferenceMismatchError,
    ReferenceStats,
    frechet_distance,
    load_adm_reference_batch,
    load_reference,
    save_reference,
    source_hash,
)
from glotok.eval.inception import (
    IS_UNAVAILABLE,
    ClassifierUnavailable,
    InceptionFeatures,
    InceptionWeightsError,
    inception_score,
    inception_score_from_features,
)
from glotok.eval.metrics import (
    CodeCounter,
    ScalarMean,
    precision_recall,
    psnr,
    quantize_to_uint8,
    ssim,
)
from glotok.eval.uniformity import LatentSample, latent_uniformity, uniformity_metrics

__all__ = [
    "ADM_REFERENCE_SHA256", "AdmReferenceBatch", "GaussianStats", "ReferenceMismatchError",
    "ReferenceStats", "frechet_distance", "load_adm_reference_batch", "load_reference",
    "save_reference", "source_hash",
    "IS_UNAVAILABLE", "ClassifierUnavailable", "InceptionFeatures", "InceptionWeightsError",
    "inception_score", "inception_score_from_features",
    "CodeCounter", "ScalarMean", "precision_recall", "psnr", "quantize_to_uint8", "ssim",
    "LatentSample", "latent_uniformity", "uniformity_metrics",
]
