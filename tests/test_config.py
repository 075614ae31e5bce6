"""kbench.core.config: the declarative bounds on options ("a whole number >= 0") that every config
checks with one function."""

import dataclasses

import pytest

from kbench.core.config import check_bounds
from kbench.core.errors import KbenchError
from kbench.serving.latency import LatencyConfig
from kbench.training.config import TrainConfig
from kbench.training.ensemble import EnsembleConfig
from kbench.training.launch import LaunchConfig

pytestmark = pytest.mark.once  # backend-independent

CONFIGS = {
    TrainConfig: dict(backbone="small_cnn", data="d", run_dir="r"),
    EnsembleConfig: dict(members=["a", "b"], run_dir="r"),
    LatencyConfig: dict(models=[]),
    LaunchConfig: {},
}
BOUNDED = [
    (cls, field.name, field.metadata["minimum"], field.metadata["below"])
    for cls in CONFIGS
    for field in dataclasses.fields(cls)
    if "minimum" in field.metadata
]


def test_the_whole_number_options_are_declared_bounded():
    names = {(cls.__name__, name) for cls, name, _, _ in BOUNDED}
    assert names == {
        ("TrainConfig", "seed"),
        ("TrainConfig", "head_epochs"),
        ("TrainConfig", "warmup_epochs"),
        ("TrainConfig", "early_stopping"),
        ("EnsembleConfig", "tta_passes"),
        ("EnsembleConfig", "seed"),
        ("LatencyConfig", "warmup"),
        ("LaunchConfig", "processes"),
    }


@pytest.mark.parametrize("cls, name, minimum, below", BOUNDED, ids=lambda v: getattr(v, "__name__", str(v)))
def test_each_bound_refuses_in_one_line_through_the_configs_own_check(cls, name, minimum, below):
    flag = "--" + name.replace("_", "-")
    bad = [minimum - 1, True, 1.5, "3"] + ([below] if below is not None else [])
    for value in bad:
        config = cls(**CONFIGS[cls], **{name: value})
        with pytest.raises(KbenchError) as error:
            config.check()
        message = str(error.value)
        assert message.startswith(f"{flag} must be a whole number >= {minimum}") and "\n" not in message
        assert message.endswith(f"got {value}")
        if below is not None:
            assert "and < 2**32" in message
    edge = below - 1 if below is not None else minimum
    check_bounds(cls(**CONFIGS[cls], **{name: minimum}), name)
    check_bounds(cls(**CONFIGS[cls], **{name: edge}), name)


def test_check_bounds_checks_only_the_named_fields():
    config = TrainConfig(**CONFIGS[TrainConfig], seed=-1, head_epochs=-1)
    with pytest.raises(KbenchError, match="--head-epochs"):
        check_bounds(config, "head_epochs")
    check_bounds(config, "warmup_epochs")
