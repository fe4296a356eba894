"""deploy/: the Prometheus alerting rules and the Grafana dashboard.

The rules must load and fire as their unit tests say (promtool, from Debian's prometheus package),
and every metric and label that the rules and the dashboard name must exist in what a real gateway
exposes on /metrics, after traffic that touches every metric: a renamed metric breaks this test,
not a dashboard in production.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.errors_helpers import ClosedPort, request, wait_until
from tests.support.observed import Observed, observed_gateway, send_mixed_traffic

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "apigate-dashboard.json"
REQUIRED_ALERTS = {
    "HighErrorRate",
    "HighLatency",
    "CircuitOpen",
    "WebhookDeadLettersGrowing",
    "RateLimitSurge",
}
METRIC = re.compile(r"\bapigate_[a-z_]+\b")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"\b([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
# Labels Prometheus adds when it scrapes (job, instance), the histogram's own (le), and the one the
# dashboard makes with label_replace (class).
NOT_EXPOSED = {"job", "instance", "le", "class"}


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install -y prometheus (CI does)"
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return orjson.loads(DASHBOARD.read_bytes())


def dashboard_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def expressions() -> dict[str, str]:
    """Every PromQL expression of the deploy files, by where it is."""
    found = {f"alerts.yml {rule['alert']}": rule["expr"] for rule in rules()}
    for panel in dashboard_panels():
        for target in panel["targets"]:
            found[f"dashboard {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            found[f"dashboard variable {variable['name']}"] = variable["query"]["query"]
    return found


def test_the_rules_load_and_their_unit_tests_pass() -> None:
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [tool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_severity_a_summary_and_the_required_ones_are_tested() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert tested >= REQUIRED_ALERTS


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert {"datasource", "job", "instance", "route"} <= {v["name"] for v in board["templating"]["list"]}
    taken: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']!r} overlaps another panel"
        taken |= cells
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(METRIC.search(t["expr"]) for t in panel["targets"]), panel["title"]
    titles = " ".join(panel["title"].lower() for panel in dashboard_panels())
    for topic in [
        "request rate",
        "error rate",
        "p95",
        "rate limited",
        "auth failures",
        "upstream latency",
        "circuit",
        "target health",
        "webhooks",
    ]:
        assert topic in titles, topic


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[dict[str, set[str]]]:
    """A gateway's /metrics after traffic that touches every metric: metric name -> its labels."""
    closed = ClosedPort()

    def add_failing_upstreams(config: dict) -> None:
        backend = config["upstreams"]["backend"]["targets"][0]
        config["upstreams"]["half-down"] = {"targets": [closed.url, backend]}  # a retry per round
        config["upstreams"]["down"] = {"targets": [closed.url], "circuit_breaker": {"failures": 1}}
        config["routes"] += [
            {"name": "retried", "path": "/retried", "upstream": "half-down", "retries": 1},
            {"name": "down", "path": "/down", "upstream": "down", "retries": 0},
        ]

    try:
        with observed_gateway(tmp_path, add_failing_upstreams) as observed:
            port = observed.gateway.port
            send_mixed_traffic(port)
            assert {request(port, "GET", "/retried").status for _ in range(4)} == {200}
            assert request(port, "GET", "/down").status == 502

            def webhooks_counted() -> dict[str, set[str]] | None:
                metrics = scrape(observed)
                counted = {"apigate_webhook_dead_letters", "apigate_webhook_backlog"} <= set(metrics)
                return metrics if counted else None

            yield wait_until(webhooks_counted, timeout=20, message="a dead letter and a backlog in /metrics")
    finally:
        closed.close()


def scrape(observed: Observed) -> dict[str, set[str]]:
    """Metric names (each sample's: ``_total``, ``_bucket``... included) -> the labels they carry."""
    status, body = observed.admin_get("/metrics")
    assert status == 200, body
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
            names.setdefault(family.name, set()).update(sample.labels)
    return names


def test_every_metric_and_label_the_deploy_files_name_is_exposed(scraped: dict[str, set[str]]) -> None:
    missing = []
    for where, expr in expressions().items():
        metrics = set(METRIC.findall(expr))
        assert metrics, f"{where} names no apigate metric"
        missing += [f"{where}: metric {name}" for name in sorted(metrics) if name not in scraped]
        exposed = set().union(*(scraped.get(name, set()) for name in metrics))
        used = {
            label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label.strip()
        }
        used |= set(MATCHER.findall(expr))
        missing += [f"{where}: label {label}" for label in sorted(used - NOT_EXPOSED - exposed)]
    assert missing == [], "\n".join(missing)
