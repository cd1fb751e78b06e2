"""The scikit-learn SVM baseline: an RBF (or other kernel) SVC on average-pooled pixels.

Features: the preprocessed image (C, *S) in [0, 1] is average-pooled to ``feature_size`` per spatial axis and
flattened, giving ``C * feature_size**spatial_dims`` values per sample. The classifier is a
``StandardScaler -> SVC(probability=True)`` pipeline so it yields a positive-class probability like the CNNs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline


def pool_features(x: np.ndarray, feature_size: int) -> np.ndarray:
    """Average-pool images to ``feature_size`` per spatial axis and flatten.

    Args:
        x: float32 array (N, C, *S) with S of length 2 or 3; each spatial size must be >= feature_size.
        feature_size: output size per spatial axis.

    Returns:
        float32 array (N, C * feature_size ** len(S)).
    """
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    spatial = x.ndim - 2
    pool = F.adaptive_avg_pool2d if spatial == 2 else F.adaptive_avg_pool3d
    return pool(t, feature_size).reshape(len(x), -1).numpy()


def build_svm(C: float, kernel: str, seed: int) -> Pipeline:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(C=C, kernel=kernel, probability=True, random_state=seed))
