"""Scores and statistics in plain numpy (nothing of keras or of the rest of kbench)."""

from __future__ import annotations

import numpy as np

KAGGLE_EPSILON = 1e-15


def _as_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """(N,), (N, 1) -> binary P(class 1) of shape (N,); (N, C) with C > 1 stays."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim == 2 and probabilities.shape[1] == 1:
        return probabilities[:, 0]
    return probabilities


def log_loss(labels, probabilities, eps: float = KAGGLE_EPSILON) -> float:
    """Log loss as Kaggle and scikit-learn compute it: natural log, probabilities clipped to
    [eps, 1 - eps]; for several classes the clipped rows are renormalised.

    >>> round(log_loss([1, 0], [0.9, 0.2]), 6)
    0.164252
    """
    labels = np.asarray(labels, dtype=np.int64)
    p = _as_probabilities(probabilities)
    if len(labels) != len(p) or len(labels) == 0:
        raise ValueError(f"need as many labels as predictions (got {len(labels)} and {len(p)})")
    if p.ndim == 1:
        p = np.clip(p, eps, 1 - eps)
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    p = np.clip(p, eps, 1 - eps)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def predicted_classes(probabilities) -> np.ndarray:
    p = _as_probabilities(probabilities)
    return (p >= 0.5).astype(np.int64) if p.ndim == 1 else np.argmax(p, axis=1)


def accuracy(labels, probabilities) -> float:
    labels = np.asarray(labels, dtype=np.int64)
    return float(np.mean(predicted_classes(probabilities) == labels))


def relative_difference(expected, got) -> float:
    """Largest |got - expected| relative to the output's scale: 1 for probabilities (values in [0, 1],
    even a confident model's ~1e-5 outputs, where a relative measure would flag float rounding), else
    the largest |expected|. How kbench compares a runtime's outputs with Keras'.

    >>> round(relative_difference([0.2, 0.9], [0.2, 0.91]), 6)
    0.01
    """
    expected = np.asarray(expected, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    probability = expected.min() >= 0 and expected.max() <= 1
    scale = 1.0 if probability else max(float(np.max(np.abs(expected))), 1e-6)
    return float(np.max(np.abs(got - expected))) / scale
