"""The staged rollout plan: durations, stages, guardrails, stopping rules, config loading."""

from __future__ import annotations

import pytest

from feedrank.config import ConfigError, load_yaml
from feedrank.experiment.metrics import Guardrail
from feedrank.experiment.power import Design, MetricModel, sample_size
from feedrank.experiment.rollout import RolloutConfig, build_plan

METRIC = MetricModel("time_spent", 120.0, 300.0)


def test_plan_duration_rounds_up_to_whole_weeks():
    # sample: 2 x ceil(7.849 * 2 * 300^2 / 2.4^2) = 2 x 245,278 users; 10,000 users/day -> 50 days -> 56
    plan = build_plan(METRIC, 0.02, daily_users=200_000, traffic=0.05)
    assert plan.sample == sample_size(METRIC, 0.02)
    assert plan.days_needed == 50 and plan.days == 56
    assert [s.name for s in plan.stages] == ["canary", "experiment", "ramp 25%", "ramp 50%", "ramp 100%"]
    experiment = plan.stages[1]
    assert experiment.traffic == 0.05 and experiment.hours == 24 * 56
    assert plan.stages[0].traffic == 0.001 and plan.stages[0].hours == 24
    assert not plan.warnings
    exact = build_plan(METRIC, 0.02, 200_000, 0.05, config=RolloutConfig(whole_weeks=False))
    assert exact.days == 50


def test_plan_mde_by_duration_shrinks_with_sqrt_of_days():
    plan = build_plan(METRIC, 0.02, 200_000, 0.05)
    by_days = plan.mde_by_days
    assert by_days[28].relative == pytest.approx(by_days[7].relative / 2)


def test_long_plans_warn_and_ramp_skips_shares_below_the_experiment():
    plan = build_plan(METRIC, 0.005, 200_000, 0.30)
    assert any("days (> 56)" in w for w in plan.warnings)
    assert [s.name for s in plan.stages] == ["canary", "experiment", "ramp 50%", "ramp 100%"]


def test_stopping_rules_follow_sequential_setting():
    fixed = build_plan(METRIC, 0.02, 200_000, 0.05)
    success = next(r for r in fixed.stopping_rules if r.kind == "success")
    assert "decide only at day 56" in success.rule
    assert sum(r.kind == "harm" for r in fixed.stopping_rules) == 3
    seq = build_plan(METRIC, 0.02, 200_000, 0.05, config=RolloutConfig(sequential=True))
    assert "always-valid" in next(r for r in seq.stopping_rules if r.kind == "success").rule


def test_plan_text_and_dict():
    plan = build_plan(METRIC, 0.02, 200_000, 0.05, Design(ratio=1.0))
    text = plan.render_text()
    assert "Sample: 245,278 control + 245,278 treatment = 490,556 users" in text
    assert "5% (2.5% control, 2.5% treatment) for 56 days" in text
    d = plan.to_dict()
    assert d["sample"]["total"] == 490_556 and d["days"] == 56
    assert d["guardrails"][0] == {"metric": "hide_rate", "max_harm": 0.05, "alpha": 0.05}


@pytest.mark.parametrize(
    "traffic, match", [(0.0, "traffic must be in"), (1.5, "traffic must be in"), (-0.1, "traffic must be in")]
)
def test_bad_traffic(traffic, match):
    with pytest.raises(ValueError, match=match):
        build_plan(METRIC, 0.02, 200_000, traffic)


def test_config_from_yaml_and_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("rollout:\n  sequential: true\n  guardrails:\n    - {metric: hide_rate, max_harm: 0.02}\n")
    config = load_yaml(RolloutConfig, good, section="rollout")
    assert config.sequential and config.guardrails == [Guardrail("hide_rate", 0.02)]
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  canary_hourz: 12\n")
    with pytest.raises(ConfigError, match="canary_hourz"):
        load_yaml(RolloutConfig, bad, section="rollout")
    worse = tmp_path / "worse.yaml"
    worse.write_text("rollout:\n  ramp: [0.5, 0.25]\n")
    with pytest.raises(ConfigError, match="ramp: shares must increase"):
        load_yaml(RolloutConfig, worse, section="rollout")
    typo = tmp_path / "typo.yaml"
    typo.write_text("rollout:\n  guardrails:\n    - {metric: hide_rat}\n")
    with pytest.raises(ConfigError, match=r"guardrails\[0\].*'hide_rat' unknown"):
        load_yaml(RolloutConfig, typo, section="rollout")


def test_demo_config_loads():
    config = load_yaml(RolloutConfig, "configs/experiment_demo.yaml", section="rollout")
    assert [g.metric for g in config.guardrails] == ["hide_rate", "publisher_hhi", "latency_p99_ms"]
