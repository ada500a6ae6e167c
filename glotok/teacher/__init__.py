"""Teacher-histogram inputs: frozen vision models whose pooled patch features are k-means'd
into the teacher of the histogram relation loss (GLOTOK.md). The file format and the k-means
live in ``glotok.losses.teacher``; ``tools/build_teacher.py`` runs them over shards."""

from glotok.teacher.features import (
    DEFAULT_DINOV2,
    TEACHER_FEATURES,
    DinoV2Features,
    EfficientNetLite0Features,
    TeacherFeatureExtractor,
    TeacherModelError,
    build_feature_extractor,
)

__all__ = [
    "DEFAULT_DINOV2",
    "TEACHER_FEATURES",
    "DinoV2Features",
    "EfficientNetLite0Features",
    "TeacherFeatureExtractor",
    "TeacherModelError",
    "build_feature_extractor",
]
