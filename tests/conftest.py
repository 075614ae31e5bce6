"""Shared fixtures: generated images in both layouts (folders and zips); no downloads."""

import os
import subprocess
import sys

import pytest

from kbench.backend import use_backend
from kbench.synthetic import write_class_folders, write_kaggle_dataset

BACKEND = use_backend()  # the suite runs once per backend: KERAS_BACKEND=jax / tensorflow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def kaggle_data(tmp_path_factory):
    """train.zip (learnable, 240 images at 32 px), test.zip and answers.csv."""
    return write_kaggle_dataset(str(tmp_path_factory.mktemp("kaggle")), n_train=240, n_test=30, image_size=32, seed=1)


@pytest.fixture(scope="session")
def class_folders(tmp_path_factory):
    """Three classes of PNGs in one folder per class."""
    return write_class_folders(str(tmp_path_factory.mktemp("folders")), per_class=8, image_size=24,
                               classes=("ant", "bee", "cow"))


def run_cli(*args, env=None, timeout=300, cwd=None):
    """Run `python cli.py ARGS` in a fresh process; returns the CompletedProcess."""
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, os.path.join(REPO, "cli.py"), *args], capture_output=True,
                          text=True, env=environment, timeout=timeout, cwd=cwd)
