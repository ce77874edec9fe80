"""The alert rules in deploy/prometheus/ as Prometheus's own tool reads them: valid, and each
alert proven by a `promtool test rules` case that fires it."""

from __future__ import annotations

import re
from pathlib import Path

from tests.deploy.prometheus import (
    ALERTS,
    ALERTS_TEST,
    PROMETHEUS_CONFIG,
    promtool,
    scrape_config,
)

REQUIRED_ALERTS = {
    "InterestWorkerDown",
    "InterestConsumerLagGrowing",
    "InterestConsumerTimeLagHigh",
    "InterestDeadLettersHigh",
    "InterestLatencyP99High",
    "InterestModelRolloutFailed",
}


def alert_names() -> set[str]:
    return set(re.findall(r"^\s*- alert: (\w+)\s*$", ALERTS.read_text(), re.MULTILINE))


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_fires_in_its_promtool_unit_test() -> None:
    result = promtool("test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    names = alert_names()
    assert names >= REQUIRED_ALERTS
    # An alert's case fires it when an expected alert follows its `alertname:` line.
    cases = re.findall(
        r"alertname: (\w+)\n\s*exp_alerts:\n\s*- exp_labels", ALERTS_TEST.read_text()
    )
    assert set(cases) == names


def test_promtool_checks_the_deployed_config_and_one_naming_the_same_rule_files(
    tmp_path: Path,
) -> None:
    result = promtool("check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    rule_files = re.findall(r"^rule_files:\n((?:\s+- .+\n)+)", PROMETHEUS_CONFIG.read_text(), re.M)
    assert rule_files, "deploy/prometheus.yml names no rule_files"
    named = [line.strip()[2:] for line in rule_files[0].splitlines()]
    assert [PROMETHEUS_CONFIG.parent / name for name in named] == [ALERTS]

    config = tmp_path / "prometheus.yml"
    config.write_text(
        scrape_config(
            {"interest-worker": ["127.0.0.1:9108"], "interest-monitor": ["127.0.0.1:8089"]},
            [str(PROMETHEUS_CONFIG.parent / name) for name in named],
            "1s",
        )
    )
    result = promtool("check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout
