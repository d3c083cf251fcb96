"""The Prometheus rules and example configuration in deploy/prometheus, checked and unit-tested by promtool."""

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    executable = shutil.which("promtool")
    if executable is None:
        raise RuntimeError("promtool is not on PATH: run `make test`, which installs Debian's prometheus package")
    return executable


def run(promtool: str, *args: str) -> str:
    result = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_the_example_configuration_and_its_rule_files_are_valid(promtool: str):
    output = run(promtool, "check", "config", "prometheus.yml")
    assert "2 rule files found" in output


def test_every_alert_behaves_as_its_unit_tests_say(promtool: str):
    output = run(promtool, "test", "rules", "tests/chatmesh.test.yml")
    assert "SUCCESS" in output


def test_every_alert_has_a_unit_test():
    alerts = {
        line.split(":", 1)[1].strip()
        for line in (PROMETHEUS / "chatmesh.alerts.yml").read_text().splitlines()
        if line.strip().startswith("- alert:")
    }
    tests = (PROMETHEUS / "tests" / "chatmesh.test.yml").read_text()
    assert alerts
    assert {alert for alert in alerts if f"alertname: {alert}\n" not in tests} == set()
