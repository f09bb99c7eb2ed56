"""Engagement labels and per-task targets against hand-computed arrays."""

import doctest
import math

import numpy as np
import pytest
import torch

import feedrank.features.labels as labels_module
from feedrank.config import ConfigError, from_dict, load_yaml
from feedrank.features.labels import LabelConfig, engagement_labels, task_targets

# One row per case (default config: click 1, long dwell >= 10 s doubles it, share +5, hide 3, negative 1):
#   0 impression only            -> label 0, weight 1
#   1 short click (3 s)          -> label 1, weight 1
#   2 click at exactly 10 s      -> label 1, weight 2   (threshold is inclusive)
#   3 long click + share         -> label 1, weight 1*2 + 5 = 7
#   4 share without click        -> label 1, weight 5
#   5 hidden, not clicked        -> label 0, weight 3
#   6 long click then hidden     -> label 0, weight 3   (hide takes precedence)
#   7 short click + share        -> label 1, weight 1 + 5 = 6
CLICKED = [0, 1, 1, 1, 0, 0, 1, 1]
DWELL = [0.0, 3.0, 10.0, 25.0, 0.0, 0.0, 60.0, 9.99]
SHARED = [0, 0, 0, 1, 1, 0, 0, 1]
HIDDEN = [0, 0, 0, 0, 0, 1, 1, 0]
LABEL = [0, 1, 1, 1, 1, 0, 0, 1]
WEIGHT = [1, 1, 2, 7, 5, 3, 3, 6]


def test_default_config_labels_and_weights():
    label, weight = engagement_labels(np.array(CLICKED, bool), np.array(DWELL), np.array(SHARED, bool), np.array(HIDDEN, bool), LabelConfig())
    assert label.dtype == np.float32 and weight.dtype == np.float32
    np.testing.assert_array_equal(label, LABEL)
    np.testing.assert_array_equal(weight, WEIGHT)


def test_torch_gives_the_same_result_as_numpy():
    as_t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731  (Batch stores flags as float32)
    label, weight = engagement_labels(as_t(CLICKED), as_t(DWELL), as_t(SHARED), as_t(HIDDEN), LabelConfig())
    assert isinstance(label, torch.Tensor) and label.dtype == torch.float32 and weight.dtype == torch.float32
    assert label.tolist() == LABEL and weight.tolist() == WEIGHT
    # a mix of kinds is accepted and answered in torch
    label, _ = engagement_labels(as_t(CLICKED), DWELL, np.array(SHARED), HIDDEN, LabelConfig())
    assert isinstance(label, torch.Tensor) and label.tolist() == LABEL


def test_custom_yaml_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "labels:\n"
        "  click_weight: 2\n"
        "  long_dwell_s: 30\n"
        "  long_dwell_multiplier: 1.5\n"
        "  share_weight: 4\n"
        "  hide_weight: 10\n"
        "  negative_weight: 0.5\n"
    )
    cfg = load_yaml(LabelConfig, path, section="labels")
    label, weight = engagement_labels(CLICKED, DWELL, SHARED, HIDDEN, cfg)
    np.testing.assert_array_equal(label, LABEL)  # the label rule does not depend on weights
    # now only row 6 (60 s, but hidden) reaches the 30 s threshold; row 3 (25 s) is a plain click
    np.testing.assert_array_equal(weight, [0.5, 2, 2, 2 + 4, 4, 10, 10, 2 + 4])
    targets = task_targets(CLICKED, DWELL, SHARED, HIDDEN, cfg)
    np.testing.assert_array_equal(targets["long_dwell"], [0, 0, 0, 0, 0, 0, 1, 0])


def test_long_dwell_multiplier_scales_the_click_not_the_share():
    cfg = from_dict(LabelConfig, {"click_weight": 1.5, "long_dwell_multiplier": 3.0, "share_weight": 2.0})
    _, weight = engagement_labels([1, 1], [20.0, 20.0], [0, 1], [0, 0], cfg)
    np.testing.assert_allclose(weight, [1.5 * 3, 1.5 * 3 + 2])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"share_wieght": 5}, "unknown key(s) 'share_wieght'"),
        ({"hide_weight": -1}, "hide_weight must be finite and >= 0"),
        ({"long_dwell_s": "long"}, "long_dwell_s: expected float"),
        ({"click_weight": float("nan")}, "click_weight must be finite"),
    ],
)
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(LabelConfig, data, "labels")
    assert message in str(err.value)


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("labels:\n  click_weight: 1\n  dwell_treshold: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: labels: unknown key\(s\) 'dwell_treshold'"):
        load_yaml(LabelConfig, path, section="labels")


def test_task_targets_are_the_raw_facts():
    t = task_targets(CLICKED, DWELL, SHARED, HIDDEN, LabelConfig())
    assert set(t) == {"click", "long_dwell", "dwell", "share", "hide"}
    assert all(v.dtype == np.float32 for v in t.values())
    np.testing.assert_array_equal(t["click"], CLICKED)  # row 6 stays a click although hidden
    np.testing.assert_array_equal(t["long_dwell"], [0, 0, 1, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(t["share"], SHARED)
    np.testing.assert_array_equal(t["hide"], HIDDEN)
    expected_dwell = [0, math.log(4), math.log(11), math.log(26), 0, 0, math.log(61), math.log(10.99)]
    np.testing.assert_allclose(t["dwell"], expected_dwell, rtol=1e-6)


def test_task_targets_ignore_dwell_on_unclicked_rows():
    # dwell on an unclicked row is a log error (schema.validate reports it); it is not engagement
    t = task_targets([0], [50.0], [0], [0], LabelConfig())
    assert t["dwell"].tolist() == [0.0] and t["long_dwell"].tolist() == [0.0]
    _, weight = engagement_labels([0], [50.0], [0], [0], LabelConfig())
    assert weight.tolist() == [1.0]


def test_task_targets_in_torch():
    t = task_targets(torch.tensor(CLICKED), torch.tensor(DWELL), torch.tensor(SHARED), torch.tensor(HIDDEN), LabelConfig())
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in t.values())
    assert t["long_dwell"].tolist() == [0, 0, 1, 1, 0, 0, 1, 0]
    assert t["dwell"][1].item() == pytest.approx(math.log(4))


@pytest.mark.parametrize("fn", [engagement_labels, task_targets])
@pytest.mark.parametrize(
    ("dwell", "message"),
    [
        ([1.0, float("nan"), float("nan")], "dwell_s: 2 NaN value(s) of 3"),
        ([1.0, -2.0, 0.0], "dwell_s: 1 negative value(s) of 3"),
        ([float("inf"), 1.0, 0.0], "dwell_s: 1 infinite value(s) of 3"),
    ],
)
def test_bad_dwell_names_the_column_and_count(fn, dwell, message):
    with pytest.raises(ValueError) as err:
        fn([1, 1, 0], dwell, [0, 0, 0], [0, 0, 0], LabelConfig())
    assert message in str(err.value)
    with pytest.raises(ValueError) as err:  # the same check in torch
        fn(torch.ones(3), torch.tensor(dwell), torch.zeros(3), torch.zeros(3), LabelConfig())
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([1, 0], [0.0], [0, 0], [0, 0]), "columns differ in length: clicked=2, dwell_s=1, shared=2, hidden=2"),
        (([[1, 0]], [[0.0, 0.0]], [[0, 0]], [[0, 0]]), "clicked: expected a 1-D array, got shape (1, 2)"),
        (([1, 2], [0.0, 0.0], [0, 0], [0, 0]), "clicked: 1 value(s) other than 0/1"),
        (([1, 0], [0.0, 0.0], [0, float("nan")], [0, 0]), "shared: 1 value(s) other than 0/1"),
    ],
)
def test_bad_columns_name_the_problem(args, message):
    with pytest.raises(ValueError) as err:
        engagement_labels(*args, LabelConfig())
    assert message in str(err.value)


def test_empty_input_gives_empty_output():
    label, weight = engagement_labels([], [], [], [], LabelConfig())
    assert label.shape == (0,) and weight.shape == (0,)
    assert all(v.shape == (0,) for v in task_targets([], [], [], [], LabelConfig()).values())


def test_module_docstring_example():
    result = doctest.testmod(labels_module)
    assert result.attempted >= 1 and result.failed == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_results_stay_on_the_input_device():
    clicked = torch.tensor(CLICKED, dtype=torch.float32, device="cuda")
    label, weight = engagement_labels(clicked, DWELL, SHARED, HIDDEN, LabelConfig())
    assert label.device == clicked.device and weight.device == clicked.device
    assert weight.tolist() == WEIGHT
