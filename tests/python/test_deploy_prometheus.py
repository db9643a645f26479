"""The Prometheus part of deploy/: scrape config, alert rules, their unit tests, and the runbook.

- promtool accepts the config (with its rule file and file_sd files), the rules, and the rules'
  unit tests; and the unit tests pin the thresholds: loosening any of them, or dropping a
  guard, makes `promtool test rules` fail.
- Every alert has a unit test where it fires (labels and annotations checked) and one where it
  stays silent; every recording rule has an expression test.
- Every alert says what is wrong and links a heading of docs/RUNBOOK.md that exists.
- Every metric name (and label name) the rules, their unit tests and the runbook's PromQL use
  is one the observer exports, as `observer metrics-reference` lists it.
"""

import concurrent.futures
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import REPO, observer_bin
from promql import AGGREGATIONS, FUNCTIONS, KEYWORDS, LABEL_LISTS, tokens

PROMETHEUS = REPO / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "rules" / "observer.rules.yml"
RULE_TESTS = PROMETHEUS / "tests" / "observer.rules.test.yml"
FILE_SD = PROMETHEUS / "file_sd" / "observer-hosts.yml"
RUNBOOK = REPO / "docs" / "RUNBOOK.md"

RUNBOOK_BASE = "https://github.com/observer/observer/blob/main/docs/RUNBOOK.md#"
# What the issue asks for; more alerts are welcome, fewer are not.
REQUIRED_ALERTS = {
    "ObserverDown",
    "ObserverGatewayDown",
    "ObserverErrorRatioHigh",
    "ObserverLatencyP95High",
    "ObserverFirstChunkP95High",
    "ObserverModelNotReady",
    "ObserverEbpfEventsLost",
    "ObserverModelServerSaturated",
    "ObserverModelServerRejecting",
    "ObserverPromptsTruncated",
}
SEVERITIES = {"critical", "warning", "info"}
# Labels Prometheus or the scrape config add to every series of a target.
TARGET_LABELS = {"instance", "job", "host", "cluster", "gateway"}
# Series Prometheus makes itself, with only target labels (or, for ALERTS, alert labels).
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"}


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run scripts/setup.sh (Debian package `prometheus`)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def rules() -> list[dict]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def recorded() -> dict[str, dict]:
    return {rule["record"]: rule for rule in rules() if "record" in rule}


def rule_tests() -> list[dict]:
    return load_yaml(RULE_TESTS)["tests"]


# ---------------------------------------------------------------------------- promtool


def test_config_is_valid():
    result = promtool("check", "config", str(CONFIG.relative_to(REPO)))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A file_sd pattern that matches no file is only a warning to promtool.
    assert "WARNING" not in output, output


def test_rules_are_valid():
    result = promtool("check", "rules", str(RULES.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass():
    result = promtool("test", "rules", str(RULE_TESTS.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# Each (alert, old, new) loosens one threshold, `for` duration or guard of the alert, or drops a
# case it handles; the alert's unit tests (those whose name starts with the alert's name) must
# notice every one. `old` must occur exactly once in the rules.
MUTATIONS = [
    ("ObserverErrorRatioHigh", "ratio_rate5m > 0.02", "ratio_rate5m > 0.019"),
    ("ObserverErrorRatioHigh", "errors:rate5m * 300 >= 3", "errors:rate5m * 300 >= 2"),
    ("ObserverErrorRatioHigh", 'code=~"5..|none"}', 'code=~"5.."}'),
    ("ObserverErrorRatioHigh", "gateway_errors:rate5m * 300 >= 3\n        for: 3m\n",
     "gateway_errors:rate5m * 300 >= 3\n        for: 2m\n"),
    ("ObserverLatencyP95High", "p95_5m > 3\n", "p95_5m > 2.9\n"),
    ("ObserverLatencyP95High", "requests:rate5m * 300 >= 10", "requests:rate5m * 300 >= 5"),
    ("ObserverLatencyP95High", "        for: 2m\n        labels:\n          severity: warning",
     "        for: 1m\n        labels:\n          severity: warning"),
    ("ObserverFirstChunkP95High", "p95_5m > 5\n", "p95_5m > 4.9\n"),
    ("ObserverFirstChunkP95High", "first_tokens:rate5m * 300 >= 10", "first_tokens:rate5m * 300 >= 5"),
    ("ObserverFirstChunkP95High", "first_tokens:rate5m * 300 >= 10\n        for: 5m\n",
     "first_tokens:rate5m * 300 >= 10\n        for: 4m\n"),
    # The recorded series sum the operations and API dialects, and read the gateway's side only.
    ("ObserverFirstChunkP95High", '(rate(gen_ai_server_time_to_first_token_seconds_bucket{role="gateway"}[5m]))',
     '(rate(gen_ai_server_time_to_first_token_seconds_bucket[5m]))'),
    ("ObserverAgentTurnsFailing", "ratio_rate5m > 0.05", "ratio_rate5m > 0.04"),
    ("ObserverAgentTurnsFailing", "turn_failures:rate5m * 300 >= 3", "turn_failures:rate5m * 300 >= 2"),
    ("ObserverAgentTurnsFailing", "turn_failure_ratio:ratio_rate5m > 0.05\n          and instance:observer_gateway_turn_failures:rate5m * 300 >= 3\n        for: 3m\n",
     "turn_failure_ratio:ratio_rate5m > 0.05\n          and instance:observer_gateway_turn_failures:rate5m * 300 >= 3\n        for: 2m\n"),
    ("ObserverModelNotReady", "observer_model_ready == 0\n        for: 1m",
     "observer_model_ready == 0\n        for: 0m"),
    ("ObserverModelNotReady", "observer_model_ready == 0", "observer_model_ready < 0"),
    ("ObserverGatewayDown", '{mode="ebpf",gateway!="none"}', '{gateway!="none"}'),
    ("ObserverGatewayDown", '{mode="ebpf",gateway!="none"}', '{mode="ebpf"}'),
    ("ObserverGatewayDown", "unless on (instance, job) observer_target_process_threads",
     "unless on (instance, job) observer_target_process_open_fds"),
    ("ObserverGatewayDown", '[6h])', '[1m])'),
    ("ObserverDown", 'up{job="observer"} == 0 or absent(up{job="observer"})', 'up{job="observer"} == 0'),
    ("ObserverDown", "        for: 2m\n        labels:\n          severity: critical",
     "        for: 1m\n        labels:\n          severity: critical"),
    ("ObserverEbpfEventsLost", "\n          or\n          (observer_ebpf_events_lost_total > 0 unless "
     "observer_ebpf_events_lost_total offset 5m)", ""),
    ("ObserverEbpfEventsLost", "increase(observer_ebpf_events_lost_total[5m]) > 0",
     "increase(observer_ebpf_events_lost_total[5m]) > 5"),
    ("ObserverModelServerSaturated", "observer_llm_requests_waiting > 0", "observer_llm_requests_waiting > 1"),
    ("ObserverModelServerSaturated", "observer_llm_requests_waiting > 0", "observer_llm_requests_waiting >= 0"),
    ("ObserverModelServerSaturated", "queue_wait_seconds:p95_5m > 1\n", "queue_wait_seconds:p95_5m > 0.9\n"),
    ("ObserverModelServerSaturated", "queue_wait_seconds:p95_5m > 1\n", "queue_wait_seconds:p95_5m > 2\n"),
    ("ObserverModelServerSaturated", "queue_waits:rate5m * 300 >= 10", "queue_waits:rate5m * 300 >= 5"),
    ("ObserverModelServerSaturated", "queue_waits:rate5m * 300 >= 10\n          )\n        for: 5m\n",
     "queue_waits:rate5m * 300 >= 10\n          )\n        for: 4m\n"),
    ("ObserverModelServerSaturated", 'phase_seconds_bucket{phase="queue"}', "phase_seconds_bucket"),
    ("ObserverModelServerRejecting", "max without (role) (\n", "sum without (role) (\n"),
    ("ObserverModelServerRejecting", 'increase(observer_llm_rejected_requests_total{reason="server_busy"}[5m])',
     "increase(observer_llm_rejected_requests_total[5m])"),
    ("ObserverModelServerRejecting", '\n              or\n              (observer_llm_rejected_requests_total{reason="server_busy"} > 0 '
     'unless observer_llm_rejected_requests_total{reason="server_busy"} offset 5m)', ""),
    ("ObserverPromptsTruncated", "increase(observer_llm_prompts_at_context_total[5m]) > 0",
     "increase(observer_llm_prompts_at_context_total[5m]) > 3"),
    ("ObserverPromptsTruncated", "\n          or\n          (observer_llm_prompts_at_context_total > 0 unless "
     "observer_llm_prompts_at_context_total offset 5m)", ""),
]


def test_unit_tests_pin_every_threshold(tmp_path):
    original = RULES.read_text()
    suite = load_yaml(RULE_TESTS)
    runs = []
    for n, (alert, old, new) in enumerate(MUTATIONS):
        assert original.count(old) == 1, f"mutation {n}: {old!r} occurs {original.count(old)} times in the rules"
        root = tmp_path / str(n)
        root.mkdir()
        (root / "rules.yml").write_text(original.replace(old, new))
        tests = [test for test in suite["tests"] if test["name"].startswith(alert + " ")]
        assert tests, f"no unit test is named after {alert}"
        (root / "tests.yml").write_text(yaml.safe_dump({**suite, "rule_files": ["rules.yml"], "tests": tests}))
        runs.append((old, new, root))

    def run(item):
        old, new, root = item
        return old, new, promtool("test", "rules", "tests.yml", cwd=root)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(run, runs))
    for old, new, result in results:
        assert "got:" in result.stdout + result.stderr, \
            f"the unit tests still pass with {old!r} changed to {new!r}: {result.stdout}{result.stderr}"
        assert result.returncode != 0


# ---------------------------------------------------------------------------- scrape config


def test_scrape_config():
    config = load_yaml(CONFIG)
    assert [CONFIG.parent / path for path in config["rule_files"]] == [RULES]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["observer"]
    assert job.get("scrape_interval", config["global"].get("scrape_interval")) == "15s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["127.0.0.1:9464"], "the admin server's default address"

    patterns = [pattern for sd in job["file_sd_configs"] for pattern in sd["files"]]
    matched = {path for pattern in patterns for path in CONFIG.parent.glob(pattern)}
    assert FILE_SD in matched, f"{patterns} (relative to {CONFIG.parent}) must match {FILE_SD}"

    groups = load_yaml(FILE_SD)
    assert len(groups) >= 3, "an example fleet of a few hosts"
    hosts = set()
    for group in groups:
        assert {"host", "cluster"} <= set(group["labels"]), group
        assert set(group["labels"]) <= TARGET_LABELS, f"document the new target label: {group}"
        for target in group["targets"]:
            assert re.fullmatch(r"[\w.-]+:9464", target), target
        hosts.add(group["labels"]["host"])
    assert len(hosts) == len(groups), "one group per host, so each carries its own host label"
    assert any(group["labels"].get("gateway") == "none" for group in groups), \
        "show the gateway=\"none\" opt-out that ObserverGatewayDown reads"


# ---------------------------------------------------------------------------- alert rules


def test_required_alerts_are_defined():
    missing = REQUIRED_ALERTS - set(alerts())
    assert not missing, f"missing alerts: {sorted(missing)}"


def test_alerts_are_actionable():
    for name, rule in alerts().items():
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        notes = rule.get("annotations", {})
        assert {"summary", "description", "runbook_url"} <= set(notes), f"{name}: annotations"
        assert "$labels.instance" in notes["summary"] + notes["description"], \
            f"{name}: say which host"
        assert len(notes["description"]) >= 200, f"{name}: the description must say what to check"
        assert notes["runbook_url"] == RUNBOOK_BASE + name.lower(), f"{name}: runbook_url"
    # Alerts on a measured value say what the value is.
    for name in ("ObserverErrorRatioHigh", "ObserverLatencyP95High", "ObserverFirstChunkP95High",
                 "ObserverEbpfEventsLost", "ObserverModelServerSaturated", "ObserverModelServerRejecting",
                 "ObserverPromptsTruncated"):
        assert "$value" in alerts()[name]["annotations"]["description"], name


def test_thresholds_and_durations_of_the_issue():
    rule = alerts()
    assert rule["ObserverErrorRatioHigh"]["for"] == "3m"
    assert rule["ObserverLatencyP95High"]["for"] == "2m"
    assert rule["ObserverModelNotReady"]["for"] == "1m"
    assert "observer_model_ready == 0" in rule["ObserverModelNotReady"]["expr"]
    assert "increase(observer_ebpf_events_lost_total[5m]) > 0" in rule["ObserverEbpfEventsLost"]["expr"]
    assert 'up{job="observer"} == 0' in rule["ObserverDown"]["expr"]
    record = recorded()
    assert 'code=~"5..|none"' in record["instance:observer_gateway_errors:rate5m"]["expr"]
    assert "histogram_quantile(0.95," in record["instance:observer_gateway_request_duration_seconds:p95_5m"]["expr"]


def test_aggregations_keep_the_instance():
    # `by (...)` must list instance, or the alert cannot say which host (use `without`).
    for rule in rules():
        name = rule.get("alert") or rule.get("record")
        for labels in re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"]):
            assert "instance" in labels, f"{name}: by ({labels}) drops the instance"


# ---------------------------------------------------------------------------- unit test coverage


def alert_cases() -> list[tuple[str, dict, list[dict]]]:
    """(test name, alert_rule_test case, exp_alerts) for every alert case of the unit tests."""
    return [
        (test.get("name", "?"), case, case.get("exp_alerts") or [])
        for test in rule_tests()
        for case in test.get("alert_rule_test", [])
    ]


def test_every_alert_has_a_firing_and_a_silent_case():
    cases = alert_cases()
    for name in alerts():
        firing = [exp for _, case, exp in cases if case["alertname"] == name and exp]
        silent = [case for _, case, exp in cases if case["alertname"] == name and not exp]
        assert firing, f"{name}: no unit test where it fires"
        assert silent, f"{name}: no unit test where it stays silent"
        checked = [alert for exp in firing for alert in exp
                   if alert.get("exp_labels", {}).get("severity") and alert.get("exp_annotations")]
        assert checked, f"{name}: no firing case checks its severity and annotations"
        assert any("instance" in alert["exp_labels"] for alert in checked), \
            f"{name}: no firing case shows the instance label kept"
        for alert in checked:
            assert {"summary", "description", "runbook_url"} <= set(alert["exp_annotations"]), name
    unknown = {case["alertname"] for _, case, _ in cases} - set(alerts())
    assert not unknown, f"unit tests of alerts that do not exist: {unknown}"


def test_every_recording_rule_has_an_expression_test():
    cases = [case for test in rule_tests() for case in test.get("promql_expr_test", [])]
    for name in recorded():
        tested = [case for case in cases if name in case["expr"] and case.get("exp_samples")]
        assert tested, f"{name}: no promql_expr_test with expected samples"


# ---------------------------------------------------------------------------- runbook


def headings(markdown: str) -> list[str]:
    """Heading texts outside fenced code blocks (where `# comment` is not a heading)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            out.append(match.group(1))
    return out


def github_anchor(heading: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(markdown):
        anchor = github_anchor(heading)
        out.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return out


def sections(markdown: str) -> dict[str, str]:
    """Level-2 heading → its text up to the next level-2 heading."""
    parts = re.split(r"^## +(.+)$", markdown, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_github_anchor():
    assert github_anchor("ObserverErrorRatioHigh") == "observererrorratiohigh"
    assert github_anchor("First checks on a host") == "first-checks-on-a-host"
    assert github_anchor("`up` is 0 (really?)") == "up-is-0-really"
    assert headings("# A\n```\n# not a heading\n```\n## B c") == ["A", "B c"]


def test_runbook_urls_point_at_headings():
    text = RUNBOOK.read_text()
    present = anchors(text)
    for name, rule in alerts().items():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_BASE), url
        assert url.removeprefix(RUNBOOK_BASE) in present, f"{name}: no heading for {url}"
    for link in re.findall(r"\]\(#([^)]+)\)", text):
        assert link in present, f"RUNBOOK.md links to #{link}, which is no heading"


def test_runbook_section_per_alert():
    parts = sections(RUNBOOK.read_text())
    for name in alerts():
        assert name in parts, f"docs/RUNBOOK.md has no '## {name}' section"
        body = parts[name]
        for part in ("**What it means.**", "**Look closer.**", "**First checks.**",
                     "**Likely causes and fixes.**"):
            assert part in body, f"{name}: no {part}"
        assert "```promql" in body, f"{name}: no PromQL to look closer with"


def test_runbook_queries_and_first_checks():
    text = RUNBOOK.read_text()
    queries = sections(text)["Runbook queries"]
    for query in (  # docs/DESIGN.md#metrics-runbook-queries, verbatim
        "rate(observer_http_requests_total[1m])",
        "histogram_quantile(0.95, sum by (le) (rate(observer_http_request_duration_seconds_bucket[5m])))",
        "observer_http_requests_in_flight",
    ):
        assert query in queries, query
    assert re.search(r'code=~"2\.\."\}\[5m\]\)\)\s*/', queries), "the success ratio over 5 minutes"
    for command in ("observer check", "observer probe --model", "curl -s 127.0.0.1:9464/status",
                    "journalctl -u observer", "systemctl status ollama"):
        assert command in text, command


def runbook_queries() -> list[str]:
    """The PromQL of the runbook's ```promql blocks: one query per line, indented lines
    continuing the one before, `#` lines skipped."""
    out: list[str] = []
    for block in re.findall(r"```promql\n(.*?)```", RUNBOOK.read_text(), flags=re.S):
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace() and out:
                out[-1] += " " + line.strip()
            else:
                out.append(line.strip())
    return out


def test_runbook_promql_parses(tmp_path):
    queries = runbook_queries()
    assert len(queries) >= 30
    rule_file = tmp_path / "runbook.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{
        "name": "runbook",
        "rules": [{"record": f"runbook:query_{n}", "expr": q} for n, q in enumerate(queries)],
    }]}))
    result = promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------- metric names



@dataclass
class Selector:
    name: str
    labels: set[str] = field(default_factory=set)


def matchers(toks: list[tuple[str, str]], i: int, expr: str) -> tuple[dict[str, str], int]:
    """Parses `{label op "value", ...}` from toks[i] == "{"; returns {label: value of an `=`
    matcher or ""} and the index after "}"."""
    out: dict[str, str] = {}
    i += 1
    while toks[i][1] != "}":
        (kind, label), (_, op), (value_kind, value) = toks[i], toks[i + 1], toks[i + 2]
        assert kind == "ident" and op in ("=", "!=", "=~", "!~") and value_kind == "string", \
            f"bad label matcher near {label!r} in {expr!r}"
        out[label] = value[1:-1] if op == "=" else ""
        i += 3
        if toks[i][1] == ",":
            i += 1
    return out, i + 1


def selectors(expr: str) -> list[Selector]:
    """The series selectors of a PromQL expression: metric names (identifiers that are not
    functions, aggregations or keywords, outside strings, ranges and the label lists of
    by/without/on/ignoring/group_left/group_right) with the label names they match on."""
    found: list[Selector] = []
    toks = tokens(expr)
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else None
        if text == "{":  # {__name__="..."} without a name in front
            labels, i = matchers(toks, i, expr)
            assert labels.get("__name__"), f"a selector without a metric name in {expr!r}"
            found.append(Selector(labels.pop("__name__"), set(labels)))
            continue
        if text == "[":
            while toks[i][1] != "]":
                i += 1
        elif kind == "ident" and text in LABEL_LISTS:
            if following == "(":
                while toks[i][1] != ")":
                    i += 1
        elif kind == "ident" and text in AGGREGATIONS:
            assert following in ("(", "by", "without"), f"{text} {following} in {expr!r}"
        elif kind == "ident" and text in FUNCTIONS:
            assert following == "(", f"{text} without ( in {expr!r}"
        elif kind == "ident" and text.lower() in KEYWORDS:
            pass
        elif kind == "ident":
            assert following != "(", f"unknown function {text}( in {expr!r}"
            selector = Selector(text)
            if following == "{":
                labels, i = matchers(toks, i + 1, expr)
                selector.labels = set(labels)
                found.append(selector)
                continue
            found.append(selector)
        i += 1
    return found


def test_selector_extraction():
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{x=~"$y", z!="b{c}"}[5m:1m] '
        'offset 1h))) / on (job) group_left(version) label_replace(b_info, "dst", "$1", "src", '
        '"(.*)") and sum(rate(c_total[1m])) without (instance) > bool 0.5e3 or vector(1) '
        "unless count(d == Inf) # e_total\n"
        "or sum without (f) (g:h:rate5m) * 300 >= 3 or {__name__=\"i\", j='k'}"
    )
    got = {s.name: s.labels for s in selectors(expr)}
    assert got == {"a_bucket": {"x", "z"}, "b_info": set(), "c_total": set(), "d": set(),
                   "g:h:rate5m": set(), "i": {"j"}}
    with pytest.raises(AssertionError, match="unknown function"):
        selectors("rat(x[5m])")


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every sample name the observer can export → its label names, from
    `observer metrics-reference --list` (`NAME TYPE` per family; a histogram's samples are
    NAME_bucket, NAME_sum and NAME_count) and the Markdown table of `observer metrics-reference`
    (`| `NAME` | TYPE | LABELS | HELP |`) for the labels."""
    binary = observer_bin()
    listed = subprocess.run([binary, "metrics-reference", "--list"], capture_output=True,
                            text=True, timeout=30)
    assert listed.returncode == 0, f"observer metrics-reference --list: {listed.stderr.strip()}"
    table = subprocess.run([binary, "metrics-reference"], capture_output=True, text=True, timeout=30)
    assert table.returncode == 0, f"observer metrics-reference: {table.stderr.strip()}"
    labels = {
        match.group(1): {label.strip() for label in match.group(2).split(",") if label.strip()}
        for match in re.finditer(r"^\|\s*`([^`]+)`\s*\|\s*\w+\s*\|([^|]*)\|", table.stdout, flags=re.M)
    }
    out: dict[str, set[str]] = {}
    for line in listed.stdout.splitlines():
        if not line.strip():
            continue
        name, kind = line.split()
        assert name in labels, f"{name} is in --list but not in the Markdown table"
        if kind == "histogram":
            out[f"{name}_bucket"] = labels[name] | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = labels[name]
        elif kind == "counter" and not name.endswith("_total"):
            out[name] = out[f"{name}_total"] = labels[name]
        else:
            out[name] = labels[name]
    assert "observer_http_requests_total" in out and "process_cpu_seconds_total" in out
    return out


def check_selectors(where: str, found: list[Selector], exported: dict[str, set[str]],
                    also: set[str] = frozenset()) -> list[str]:
    problems = []
    for selector in found:
        if selector.name in PROMETHEUS_SERIES or selector.name in also:
            continue
        if selector.name not in exported:
            problems.append(f"{where}: {selector.name} is not exported")
            continue
        unknown = selector.labels - exported[selector.name] - TARGET_LABELS
        if unknown:
            problems.append(f"{where}: {selector.name} has no label {sorted(unknown)}")
    return problems


def test_rule_metrics_are_exported(exported):
    problems = []
    for rule in rules():
        where = rule.get("alert") or rule.get("record")
        problems += check_selectors(where, selectors(rule["expr"]), exported, set(recorded()))
    assert not problems, "\n".join(problems)


def test_unit_test_series_are_exported(exported):
    # So that the unit tests feed the rules the series the observer really serves.
    problems = []
    for test in rule_tests():
        for series in test.get("input_series", []):
            problems += check_selectors(test.get("name", "?"), selectors(series["series"]), exported)
    assert not problems, "\n".join(problems)


def test_runbook_metrics_are_exported(exported):
    problems = []
    for query in runbook_queries():
        problems += check_selectors(f"RUNBOOK.md {query!r}", selectors(query), exported, set(recorded()))
    assert not problems, "\n".join(problems)
