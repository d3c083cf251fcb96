"""A process's Prometheus metrics, read as a scrape reads them."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from support.cluster import Cluster


def metric(cluster: Cluster, process: str, name: str, labels: dict[str, str]) -> float:
    """The sum of the samples of `name` in `process` whose labels include `labels`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_ports[process]}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
    )
