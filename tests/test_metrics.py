import math

import numpy as np
import pytest

from kbench.core import metrics

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


def test_binary_log_loss_matches_hand_computation():
    expected = -(math.log(0.9) + math.log(0.8)) / 2
    assert metrics.log_loss([1, 0], [0.9, 0.2]) == pytest.approx(expected, rel=1e-12)
    assert metrics.log_loss([1, 0], np.array([[0.9], [0.2]])) == pytest.approx(expected, rel=1e-12)


def test_log_loss_clips_like_kaggle():
    # a confident mistake costs -log(1e-15), not infinity
    assert metrics.log_loss([1], [0.0]) == pytest.approx(-math.log(1e-15))
    assert metrics.log_loss([0], [1.0]) == pytest.approx(-math.log(1 - (1 - 1e-15)))  # as float64 rounds it


def test_multiclass_log_loss_and_accuracy():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert metrics.log_loss([0, 2], p) == pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2)
    assert metrics.accuracy([0, 1], p) == 0.5


def test_log_loss_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="as many labels"):
        metrics.log_loss([0, 1], [0.5])


def test_binary_accuracy_threshold():
    assert metrics.accuracy([1, 0, 1, 0], [0.6, 0.4, 0.3, 0.7]) == 0.5
