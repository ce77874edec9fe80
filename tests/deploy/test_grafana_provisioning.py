"""What Grafana loads from deploy/: the data source and dashboard provisioning the compose file
mounts, and a dashboard whose every panel asks that data source a query. (That each query returns
data is proven against a real Prometheus in test_dashboard_queries.py.)"""

from __future__ import annotations

import re
from typing import Any

from tests.deploy.prometheus import DEPLOY, dashboard, panel_queries, panels

GRAFANA = DEPLOY / "grafana"
COMPOSE = DEPLOY / "docker-compose.yml"


def yaml_value(text: str, key: str) -> str:
    """One scalar of a provisioning file (no YAML library among the dependencies)."""
    found = re.findall(rf"^\s*{key}: *(\S+)\s*$", text, re.MULTILINE)
    assert len(found) == 1, f"{key}: {found}"
    return found[0]


def compose_mounts() -> dict[str, str]:
    """Container path -> deploy/ path of every bind mount in the compose file."""
    mounts = re.findall(r"\./([\w./-]+):(/[\w./-]+):ro", COMPOSE.read_text())
    return {container: host for host, container in mounts}


def test_the_data_source_is_prometheus_of_the_compose_file_and_the_default() -> None:
    text = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert yaml_value(text, "type") == "prometheus"
    assert yaml_value(text, "url") == "http://prometheus:9090"
    assert yaml_value(text, "isDefault") == "true"
    scrape_interval = yaml_value((DEPLOY / "prometheus.yml").read_text(), "scrape_interval")
    assert yaml_value(text, "timeInterval") == scrape_interval


def test_compose_mounts_the_provisioning_the_dashboard_and_the_rules() -> None:
    mounts = compose_mounts()
    provider = (GRAFANA / "provisioning" / "dashboards" / "interest-stream.yml").read_text()
    assert mounts[yaml_value(provider, "path")] == "grafana/dashboards"
    assert mounts["/etc/grafana/provisioning/datasources"] == "grafana/provisioning/datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == "grafana/provisioning/dashboards"
    assert mounts["/etc/prometheus/prometheus.yml"] == "prometheus.yml"
    assert mounts["/etc/prometheus/prometheus"] == "prometheus"
    for host in mounts.values():
        assert (DEPLOY / host).exists(), host
    assert '["interest", "monitor", "--host", "0.0.0.0"]' in COMPOSE.read_text()


def test_every_panel_queries_the_provisioned_data_source() -> None:
    text = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    source = {"type": "prometheus", "uid": yaml_value(text, "uid")}
    board = dashboard()
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"] == source


def test_a_panel_titled_p50_p99_plots_both() -> None:
    for panel in panels(dashboard()):
        if "p50" in panel["title"]:
            exprs = [target["expr"] for target in panel["targets"]]
            assert any(e.startswith("histogram_quantile(0.5,") for e in exprs), panel["title"]
        if "p99" in panel["title"]:
            exprs = [target["expr"] for target in panel["targets"]]
            assert any(e.startswith("histogram_quantile(0.99,") for e in exprs), panel["title"]


def test_lag_panels_select_the_chosen_consumer_group() -> None:
    for title, _, expr in panel_queries(dashboard()):
        if "kafka_consumergroup" in expr or "interest_partition_status" in expr:
            assert 'consumergroup="$consumergroup"' in expr, title


def test_panels_do_not_overlap() -> None:
    def cells(panel: dict[str, Any]) -> set[tuple[int, int]]:
        pos = panel["gridPos"]
        return {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }

    taken: set[tuple[int, int]] = set()
    for panel in panels(dashboard()):
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert not taken & cells(panel), panel["title"]
        taken |= cells(panel)
