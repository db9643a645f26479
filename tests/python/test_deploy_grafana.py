"""The Grafana dashboard and provisioning files in deploy/grafana.

Four checks: the dashboard JSON has the shape Grafana provisions without a manual import (a
datasource variable used by every panel and query, unique ids, a position for every panel, the
panels docs/DESIGN.md#operating-deployment-kit asks for); every PromQL expression in it parses, asked of a real Prometheus
(the Debian `prometheus` binary on an empty TSDB, where an instant query answers `success` when
the expression parses and `bad_data` when not); every metric name those expressions read is
one the observer exports (`observer metrics-reference --list`, plus `up`); and every label
those expressions match on is one that metric has (`observer metrics-reference`), since a
matcher on a label the family lacks (`model` on a `gen_ai_*` family, `route` on the time to
first token) makes a panel silently empty.
"""

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, observer_bin
from promql import AGGREGATIONS, FUNCTIONS, KEYWORDS, LABEL_LISTS, tokens

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "observer.json"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}

# Panels docs/DESIGN.md#operating-deployment-kit asks for, by title.
REQUIRED_TITLES = [
    "Request rate by route and code",
    "Success ratio",
    "Latency p50 / p95 / p99 (whole response)",
    "Time to first chunk p50 / p95",
    "Token throughput",
    "Per-request generation speed (tokens/s)",
    "In flight and open connections",
    "Latency distribution over time (read against in flight)",
    "Gateway overhead p50 / p95",
    "Agent turns by method and outcome",
    "Turn time to first delta and gateway time p95",
    "WebSocket messages and what could not be read",
    "Model readiness",
    "GPU memory used / total",
    "GPU utilization",
    "Errors by code (non-2xx)",
    "Capture events lost",
    "HTTP parse errors by reason",
    "Capture events read",
    "Observer memory",
    "Observer CPU",
    "Observer scrape status",
    # Where a model request's time went, and the model server's capacity.
    "Where the time went",
    "Time per request by phase (mean), $model",
    "Queue wait p95 (and after a cancel)",
    "Cold loads (model loads over 1 s)",
    "Capacity",
    "Slots, in flight and waiting",
    "Rejected requests by reason",
    "Prompts at the context limit",
    "Tool calls and estimated completion tokens",
]

# What each dashboard variable stands for when the expressions are sent to Prometheus. `.*` is
# what "All" sends for variables with that allValue; the others get a value they really take.
VARIABLE_VALUES = {
    "job": "observer",
    "instance": "127.0.0.1:9464",
    "role": "gateway",
    "model": ".*",
    "route": ".*",
    "datasource": "prometheus",
}
# Grafana's built-in variables, as Grafana would fill them for a 1 h range at a 15 s step.
BUILTIN_VALUES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
# ${name}, ${name:format}, $name and the deprecated [[name]], as Grafana interpolates them.
VARIABLE_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")
LABEL_VALUES_RE = re.compile(r"^\s*label_values\(\s*(?:(.+),\s*)?([a-zA-Z_]\w*)\s*\)\s*$", re.S)


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def variable_query(variable: dict) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else query


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable; a `label_values(SEL,
    label)` variable contributes its selector."""
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel['title']!r} target {target.get('refId')}",
                        target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable_query(variable)
        match = LABEL_VALUES_RE.match(query)
        assert match, f"variable {variable['name']}: only label_values(...) is expected, got {query!r}"
        if match.group(1):
            out.append((f"variable {variable['name']}", match.group(1)))
    return out


def substitute(expr: str, defined: set[str]) -> str:
    """The expression as Grafana would send it: dashboard and built-in variables replaced."""

    def value(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        if name.isdigit():  # a regex back-reference such as label_replace's "$1"
            return match.group(0)
        if name in BUILTIN_VALUES:
            return BUILTIN_VALUES[name]
        assert name in defined, f"${name} is not a dashboard variable (in {expr!r})"
        return VARIABLE_VALUES[name]

    return VARIABLE_RE.sub(value, expr)


# ---------------------------------------------------------------------------- structure


def test_dashboard_provisions_without_import():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "observer-llm-host"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and 36 <= dashboard["schemaVersion"] <= 41
    assert "__inputs" not in dashboard and "__requires" not in dashboard, \
        "import-only sections: provisioning would leave ${DS_...} unresolved"
    assert dashboard.get("id") is None, "a fixed numeric id clashes between Grafana instances"
    assert "${DS_" not in DASHBOARD.read_text(), "an import-time datasource placeholder is left"


def test_datasource_is_a_variable_used_everywhere():
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables.get("datasource")
    assert source and source["type"] == "datasource" and source["query"] == "prometheus"

    for name, variable in variables.items():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE_REF, f"variable {name}"
        for other in VARIABLE_RE.findall(json.dumps(variable)):
            used = next(group for group in other if group)
            assert used in variables or used in BUILTIN_VALUES or used == "__all" or used.isdigit(), \
                f"variable {name} refers to undefined ${used}"
    assert set(variables) <= set(VARIABLE_VALUES), "give the new variable a value in VARIABLE_VALUES"
    assert variables["instance"]["type"] == "query"
    assert "observer_build_info" in variable_query(variables["instance"])

    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            assert "datasource" not in panel or panel["datasource"] == DATASOURCE_REF
            assert not panel.get("targets"), f"row {panel['title']!r} has targets"
            continue
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        assert panel.get("datasource") == DATASOURCE_REF, where
        assert panel.get("targets"), f"{where} queries nothing"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE_REF, f"{where} target {target.get('refId')}"
            assert target.get("expr", "").strip(), f"{where} target {target.get('refId')} is empty"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{where}: duplicate refIds {refs}"


def test_panels_have_ids_positions_and_descriptions():
    dashboard = load_dashboard()
    panels = all_panels(dashboard)
    top_level = {id(panel) for panel in dashboard["panels"]}
    ids = [panel.get("id") for panel in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"

    occupied = {}
    for panel in panels:
        where = f"panel {panel['id']} {panel['title']!r}"
        pos = panel.get("gridPos")
        assert pos and {"h", "w", "x", "y"} <= set(pos), f"{where} has no gridPos"
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, f"{where}: {pos}"
        if id(panel) in top_level:  # panels inside a collapsed row are laid out when it opens
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in occupied, f"{where} overlaps {occupied[(x, y)]}"
                    occupied[(x, y)] = where
        if panel["type"] != "row":
            assert len(panel.get("description", "")) >= 40, f"{where} needs a description"

    titles = {panel["title"] for panel in panels}
    missing = [title for title in REQUIRED_TITLES if title not in titles]
    assert not missing, f"missing panels: {missing}"

    kinds = {panel["title"]: panel["type"] for panel in panels}
    assert kinds["Model readiness"] == "state-timeline"
    phases = next(p for p in panels if p["title"].startswith("Time per request by phase"))
    assert phases["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal", "stack the phases"
    assert phases.get("repeat") == "model", "one phase panel per model"
    assert all("by (phase)" in t["expr"] for t in phases["targets"])
    heatmap = next(p for p in panels if p["title"].startswith("Latency distribution"))
    assert heatmap["type"] == "heatmap"
    assert all(t.get("format") == "heatmap" and "by (le)" in t["expr"] for t in heatmap["targets"])


def test_expressions_use_rate_interval():
    # Panels follow the dashboard's resolution; fixed windows are kept for the "(5m)" stats.
    for where, expr in expressions(load_dashboard()):
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window == "$__rate_interval" or window == "5m", f"{where}: [{window}] in {expr}"


def test_provisioning_files():
    import yaml  # PyYAML, pinned in tests/python/requirements.txt

    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "observer.yml").read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://localhost:9090"
    assert source["uid"] and source["name"] and source["isDefault"] is True

    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "observer.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/observer"
    readme = (GRAFANA / "README.md").read_text()
    assert provider["options"]["path"] in readme, "the README must say where the JSON goes"


# ---------------------------------------------------------------------------- PromQL parses


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # 400 bad_data still carries the JSON body
        return json.load(error)


@pytest.fixture(scope="module")
def prometheus():
    """A Prometheus with an empty TSDB on a free loopback port; yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run scripts/setup.sh (Debian package `prometheus`)")
    with tempfile.TemporaryDirectory(prefix="observer-grafana-test-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 15s\n")
        base = f"http://127.0.0.1:{free_port()}"
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
             f"--web.listen-address={base.removeprefix('http://')}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError):
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"prometheus did not become ready: {process.communicate()[1]}")
                time.sleep(0.1)
            yield base
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def test_every_expression_parses(prometheus):
    dashboard = load_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    found = expressions(dashboard)
    assert len(found) >= 40
    failures = []
    for where, expr in found:
        query = substitute(expr, defined)
        answer = get_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
        if answer.get("status") != "success":
            failures.append(f"{where}: {answer.get('error')}\n    {query}")
    assert not failures, "expressions Prometheus rejects:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------- metric names



def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    aggregations or keywords, outside label matchers `{...}`, ranges `[...]`, strings, and the
    label lists after by/without/on/ignoring/group_left/group_right."""
    found: set[str] = set()
    toks = tokens(expr)
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else None
        if text in ("{", "["):
            close = "}" if text == "{" else "]"
            while i < len(toks) and toks[i][1] != close:
                if toks[i][0] == "ident" and toks[i][1] == "__name__":
                    raise AssertionError(f"{{__name__=...}} selectors are not checked: {expr!r}")
                i += 1
        elif kind == "ident" and text in LABEL_LISTS:
            if following == "(":
                i += 2
                while i < len(toks) and toks[i][1] != ")":
                    i += 1
        elif kind == "ident" and (text in FUNCTIONS or text in AGGREGATIONS):
            assert following == "(" or text in AGGREGATIONS, f"{text} without ( in {expr!r}"
        elif kind == "ident" and text in KEYWORDS:
            pass
        elif kind == "ident":
            assert following != "(", f"unknown function {text}( in {expr!r}"
            found.add(text)
        i += 1
    return found


def test_substitution():
    defined = {"instance", "model"}
    assert substitute('label_replace(x{instance=~"$instance", model=~"${model:regex}"}[$__rate_interval], '
                      '"a", "$1", "b", "(.*)")', defined) == \
        'label_replace(x{instance=~"127.0.0.1:9464", model=~".*"}[1m], "a", "$1", "b", "(.*)")'
    with pytest.raises(AssertionError, match=r"\$nope is not a dashboard variable"):
        substitute("x{a=\"$nope\"}", defined)


def test_metric_name_extraction():
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{x=~"$y", z!="b{c}"}[5m] '
        'offset 1h))) / on (job) group_left(version) label_replace(b_info, "dst", "$1", "src", '
        '"(.*)") and sum(rate(c_total[1m])) without (instance) > bool 0.5e3 or vector(1) '
        "unless count(d == 0)"
    )
    assert metric_names(expr) == {"a_bucket", "b_info", "c_total", "d"}


def exported_names() -> set[str]:
    """Every sample name the observer can export: `observer metrics-reference --list` prints
    `NAME TYPE` per family; a histogram's samples are NAME_bucket, NAME_sum and NAME_count."""
    result = subprocess.run([observer_bin(), "metrics-reference", "--list"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, (
        "`observer metrics-reference --list` failed (the subcommand this check reads the "
        f"exported families from): {result.stderr.strip()}"
    )
    names = {"up"}
    for line in result.stdout.splitlines():
        if not line.strip():
            continue
        name, kind = line.split()
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {name, f"{name}_sum", f"{name}_count"}
        elif kind == "counter" and not name.endswith("_total"):
            names |= {name, f"{name}_total"}
        else:
            names.add(name)
    assert len(names) > 40, f"suspiciously few families: {result.stdout!r}"
    return names


def test_every_metric_name_is_exported():
    exported = exported_names()
    unknown = []
    for where, expr in expressions(load_dashboard()):
        for name in sorted(metric_names(expr) - exported):
            unknown.append(f"{where}: {name}")
    assert not unknown, "metric names the observer does not export:\n" + "\n".join(unknown)


# Labels Prometheus adds to every series of a target (the dashboard filters on job and instance).
TARGET_LABELS = {"instance", "job"}


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names its matchers use) for every series selector of `expr`, found
    as metric_names() finds the names."""
    found: list[tuple[str, set[str]]] = []
    toks = tokens(expr)
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else None
        if text in ("{", "["):
            close = "}" if text == "{" else "]"
            while i < len(toks) and toks[i][1] != close:
                i += 1
        elif kind == "ident" and text in LABEL_LISTS:
            if following == "(":
                while i < len(toks) and toks[i][1] != ")":
                    i += 1
        elif kind == "ident" and (text in FUNCTIONS or text in AGGREGATIONS or text in KEYWORDS):
            pass
        elif kind == "ident":
            labels: set[str] = set()
            if following == "{":
                i += 2
                while toks[i][1] != "}":
                    if toks[i][0] == "ident" and toks[i + 1][1] in ("=", "!=", "=~", "!~"):
                        labels.add(toks[i][1])
                    i += 1
            found.append((text, labels))
        i += 1
    return found


def test_selector_label_extraction():
    expr = ('sum by (le, model) (rate(a_bucket{x=~"$y", z!="b{c}"}[5m])) / on (job) b_info '
            'and c_total{d="e"} unless vector(1)')
    assert selector_labels(expr) == [("a_bucket", {"x", "z"}), ("b_info", set()), ("c_total", {"d"})]


def exported_labels() -> dict[str, set[str]]:
    """Sample name → label names, from the Markdown table of `observer metrics-reference`
    (`| `NAME` | TYPE | LABELS | HELP |`); a histogram's _bucket adds `le`."""
    result = subprocess.run([observer_bin(), "metrics-reference"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"observer metrics-reference: {result.stderr.strip()}"
    out: dict[str, set[str]] = {}
    for match in re.finditer(r"^\|\s*`([^`]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", result.stdout, flags=re.M):
        name, kind = match.group(1), match.group(2)
        labels = {label.strip() for label in match.group(3).split(",") if label.strip()}
        if kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = labels
        elif kind == "counter" and not name.endswith("_total"):
            out[name] = out[f"{name}_total"] = labels
        else:
            out[name] = labels
    assert "observer_http_requests_total" in out, f"no table in: {result.stdout[:200]!r}"
    out["up"] = set()
    return out


def test_every_label_matcher_exists():
    exported = exported_labels()
    problems = []
    for where, expr in expressions(load_dashboard()):
        for name, labels in selector_labels(expr):
            if name not in exported:
                continue  # test_every_metric_name_is_exported reports it
            unknown = labels - exported[name] - TARGET_LABELS
            if unknown:
                problems.append(f"{where}: {name} has no label {sorted(unknown)}")
    assert not problems, "label matchers on labels the metric does not have:\n" + "\n".join(problems)
