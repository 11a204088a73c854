"""deploy/alerts.yml under promtool: the rules load, and each has unit tests
(tests/deploy/alerts_test.yml) that see it fire on a series that should page and stay quiet
on one just under its threshold or its `for`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.deploy.test_prometheus import ROOT, binary

TESTS = Path(__file__).with_name("alerts_test.yml")


def test_promtool_checks_the_rules():
    check = subprocess.run(
        [binary("promtool"), "check", "rules", str(ROOT / "deploy/alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_rule_passes_its_promtool_unit_tests():
    result = subprocess.run(
        [binary("promtool"), "test", "rules", TESTS.name],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_firing_and_a_quiet_case():
    rules = [
        r["alert"]
        for g in yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())["groups"]
        for r in g["rules"]
    ]
    cases = [c for t in yaml.safe_load(TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for name in rules:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no case where it stays quiet"
    for wanted in (
        "FlavaWorkerSilent",
        "FlavaBacklogNearLimit",
        "FlavaDeadLettersRising",
        "FlavaForgetting",
        "FlavaDrift",
        "FlavaCheckpointsFailing",
        "FlavaApiErrors",
    ):
        assert wanted in rules
