"""Copies into the Helm chart the files it renders from, since `.Files.Get` reads only the chart's own folder
(and Helm does not follow symlinks out of it):

- deploy/prometheus/*.yml|yaml rule files (those with top-level `groups`; promtool test files and
  Prometheus configs are left out) -> deploy/helm/chatmesh/files/prometheus/  (the PrometheusRule)
- deploy/grafana/**/*.json dashboards (those with top-level `panels`) -> files/grafana/  (the dashboard ConfigMap)
- services/safety/default_keywords.txt -> files/keywords/  (the keyword ConfigMap's default)

`make chart-files` runs it after any change to those originals; `--check` changes nothing, lists what
differs and exits 1 (tests/deploy/test_chart_files.py runs it so).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART_FILES = ROOT / "deploy" / "helm" / "chatmesh" / "files"


def _rule_files() -> list[Path]:
    folder = ROOT / "deploy" / "prometheus"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")]):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(document, dict) and "groups" in document:
            found.append(path)
    return found


def _dashboards() -> list[Path]:
    folder = ROOT / "deploy" / "grafana"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(document, dict) and "panels" in document:
            found.append(path)
    return found


def expected_copies() -> dict[str, dict[str, Path]]:
    """For each folder under the chart's files/: the file names it must hold and their originals."""
    copies: dict[str, dict[str, Path]] = {
        "prometheus": {},
        "grafana": {},
        "keywords": {"default_keywords.txt": ROOT / "services" / "safety" / "default_keywords.txt"},
    }
    for kind, originals in (("prometheus", _rule_files()), ("grafana", _dashboards())):
        for path in originals:
            if path.name in copies[kind]:
                raise SystemExit(f"two files named {path.name}: {copies[kind][path.name]} and {path}")
            copies[kind][path.name] = path
    return copies


def differences() -> list[str]:
    """What differs between the chart's copies and the originals, one line each; empty when in sync."""
    problems = []
    for kind, names in expected_copies().items():
        folder = CHART_FILES / kind
        present = {path.name for path in folder.iterdir() if path.is_file()} if folder.is_dir() else set()
        for name, original in sorted(names.items()):
            copy = folder / name
            if not copy.is_file():
                problems.append(f"missing: {copy.relative_to(ROOT)} (from {original.relative_to(ROOT)})")
            elif copy.read_bytes() != original.read_bytes():
                problems.append(f"differs: {copy.relative_to(ROOT)} from {original.relative_to(ROOT)}")
        for name in sorted(present - set(names)):
            problems.append(f"extra: {(folder / name).relative_to(ROOT)} has no original")
    return problems


def sync() -> None:
    for kind, names in expected_copies().items():
        folder = CHART_FILES / kind
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if path.is_file() and path.name not in names:
                path.unlink()
        for name, original in names.items():
            shutil.copyfile(original, folder / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; list differences and exit 1 if any")
    args = parser.parse_args()
    if not args.check:
        sync()
    problems = differences()
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print("run `make chart-files` to copy the originals into the chart", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
