"""The systemd units and environment file in deploy/systemd, and the Kubernetes manifest in
deploy/kubernetes.

systemd: `systemd-analyze verify` (works offline, without systemd as PID 1) must print nothing
for either unit. verify also insists that ExecStart's binary exists, and /usr/local/bin/observer
does not on a build machine, so each unit is verified as a copy whose ExecStart names the built
binary instead; the test first checks that this path is the only difference. The hardening is
checked key by key (the capability set of `observer run` exactly, nothing that would hide other
processes or the NVIDIA devices) and as a whole by `systemd-analyze security --offline`. Every
OBSERVER_* variable in the environment file must be one the binary reads (`--help` shows each
as `[env: NAME=]`), with the default the binary has, and every such variable is documented.

Kubernetes: the manifest validates against the Kubernetes 1.30 and 1.37 schemas bundled with
`kubernetes-validate` (strict: unknown fields fail; no cluster needed), and the DaemonSet
really has what the daemon needs (host namespaces, capabilities, tracefs, probes on the
admin port bound to the node's address, a Service that selects its pods).
"""

import ipaddress
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, observer_bin

SYSTEMD = REPO / "deploy" / "systemd"
RUN_UNIT = SYSTEMD / "observer.service"
PROXY_UNIT = SYSTEMD / "observer-proxy.service"
ENV_FILE = SYSTEMD / "observer.env"
MANIFEST = REPO / "deploy" / "kubernetes" / "observer-daemonset.yaml"
INSTALLED_BINARY = "/usr/local/bin/observer"

# What `observer run` needs, each explained in the unit (and verified by running it there).
RUN_CAPABILITIES = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
# Upper bounds of `systemd-analyze security` exposure (0 = fully locked down, 10 = none).
MAX_EXPOSURE = {"observer.service": 3.5, "observer-proxy.service": 2.5}
# Variables of the environment file that the units read rather than the binary.
UNIT_VARIABLES = {"RUN_ARGS": RUN_UNIT, "PROXY_ARGS": PROXY_UNIT}
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
ADMIN_PORT = 9464


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: install Debian's `systemd` package (scripts/setup.sh)")
    return path


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; keys may repeat."""
    entries = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_entries(path) if s == section and k == key]


def single(path: Path, key: str, section: str = "Service") -> str:
    found = values(path, key, section)
    assert len(found) == 1, f"{path.name}: expected one {key}= in [{section}], found {found}"
    return found[0]


def verifiable_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit with ExecStart's /usr/local/bin/observer replaced by the built binary."""
    exec_start = single(unit, "ExecStart")
    assert exec_start.startswith(INSTALLED_BINARY + " "), exec_start
    lines = unit.read_text().splitlines(keepends=True)
    prefix = "ExecStart=" + INSTALLED_BINARY + " "
    changed = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(changed) == 1, changed
    lines[changed[0]] = lines[changed[0]].replace(INSTALLED_BINARY, observer_bin(), 1)
    copy = tmp_path / unit.name
    copy.write_text("".join(lines))
    return copy


@pytest.mark.parametrize("unit", [RUN_UNIT, PROXY_UNIT], ids=lambda p: p.name)
def test_systemd_analyze_verify_is_silent(unit: Path, tmp_path: Path):
    copy = verifiable_copy(unit, tmp_path)
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--recursive-errors=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", f"systemd-analyze verify {unit.name}:\n{output}"


@pytest.mark.parametrize("unit", [RUN_UNIT, PROXY_UNIT], ids=lambda p: p.name)
def test_systemd_analyze_security_exposure(unit: Path, tmp_path: Path):
    copy = verifiable_copy(unit, tmp_path)
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE[unit.name], f"{unit.name}: exposure {exposure}\n{result.stdout}"


def common_hardening(unit: Path) -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "Restart": "on-failure",
        "EnvironmentFile": "-/etc/default/observer",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "DevicePolicy": "closed",
        "DeviceAllow": "char-nvidia* rw",
    }
    for key, value in expected.items():
        assert single(unit, key) == value, f"{unit.name}: {key}"
    assert re.fullmatch(r"\d+[KMG]", single(unit, "MemoryMax")), "MemoryMax must be a size"
    assert re.fullmatch(r"\d+s", single(unit, "RestartSec"))
    assert values(unit, "WantedBy", "Install") == ["multi-user.target"]
    # These would hide the NVIDIA devices or other users' processes, or cut the host's network.
    for key in ["PrivateDevices", "ProtectProc", "ProcSubset", "PrivateNetwork", "PrivateUsers"]:
        assert not values(unit, key), f"{unit.name} must not set {key}="


def test_run_unit_hardening():
    common_hardening(RUN_UNIT)
    assert single(RUN_UNIT, "ExecStart") == f"{INSTALLED_BINARY} run $RUN_ARGS"
    # Root with exactly the capabilities the capture needs; no CAP_SYS_ADMIN (tracefs is mounted
    # by systemd's sys-kernel-tracing.mount, ordered before the daemon).
    assert not values(RUN_UNIT, "User") and not values(RUN_UNIT, "DynamicUser")
    assert set(single(RUN_UNIT, "CapabilityBoundingSet").split()) == RUN_CAPABILITIES
    assert "sys-kernel-tracing.mount" in values(RUN_UNIT, "Wants", "Unit")
    assert "sys-kernel-tracing.mount" in values(RUN_UNIT, "After", "Unit")
    assert single(RUN_UNIT, "LimitMEMLOCK") == "infinity"
    # The tracefs it reads stays readable (read-only) under ProtectKernelTunables=yes.
    assert single(RUN_UNIT, "ProtectKernelTunables") == "yes"
    assert set(single(RUN_UNIT, "SystemCallFilter").split()) == {"@system-service", "bpf", "perf_event_open"}


def test_proxy_unit_hardening():
    common_hardening(PROXY_UNIT)
    assert single(PROXY_UNIT, "ExecStart") == f"{INSTALLED_BINARY} proxy $PROXY_ARGS"
    assert single(PROXY_UNIT, "DynamicUser") == "yes"
    assert not values(PROXY_UNIT, "User")
    assert single(PROXY_UNIT, "CapabilityBoundingSet") == ""
    assert single(PROXY_UNIT, "AmbientCapabilities") == ""
    assert values(PROXY_UNIT, "SystemCallFilter") == ["@system-service", "~@privileged"]
    # Two descriptors per connection: the default soft limit of 1024 is too small.
    assert int(single(PROXY_UNIT, "LimitNOFILE")) >= 4096
    # Longer than the default --drain-timeout (30 s), so SIGTERM's drain is not cut short.
    assert int(single(PROXY_UNIT, "TimeoutStopSec").rstrip("s")) > 30


def help_options(subcommand: str) -> dict[str, str | None]:
    """OBSERVER_* variable → the default `observer SUBCOMMAND --help` shows (None: none)."""
    result = subprocess.run(
        [observer_bin(), subcommand, "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    options: dict[str, str | None] = {}
    # Long help: one block per option, starting at its `--flag` line.
    for block in re.split(r"\n(?=\s*(?:-\w, )?--[a-z])", result.stdout):
        env = re.search(r"\[env: (OBSERVER_[A-Z_]+)=", block)
        if env:
            default = re.search(r"\[default: ([^\]]*)\]", block)
            options[env.group(1)] = default.group(1) if default else None
    return options


def env_file_entries() -> list[tuple[str, str, bool]]:
    """(name, value, commented) for every `NAME=value` line, commented out or not."""
    entries = []
    for raw in ENV_FILE.read_text().splitlines():
        match = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", raw)
        if match:
            entries.append((match.group(2), match.group(3), match.group(1) == "#"))
        else:
            assert raw == "" or raw.startswith("#"), f"observer.env: not a comment or assignment: {raw!r}"
    return entries


def test_env_file_variables_are_read_by_the_binary():
    run, proxy = help_options("run"), help_options("proxy")
    read = {**proxy, **run}
    assert "OBSERVER_METRICS_ADDR" in run and "OBSERVER_LISTEN" in proxy, "help parsing broke"
    entries = env_file_entries()
    documented = set()
    for name, value, commented in entries:
        if name in UNIT_VARIABLES:
            assert f"${name}" in single(UNIT_VARIABLES[name], "ExecStart"), name
            continue
        assert name in read, f"observer.env sets {name}, which neither `observer run` nor `observer proxy` reads"
        # An empty value makes the daemon stop ("a value is required"); defaults stay commented.
        assert value != "", f"observer.env: {name} has no value"
        assert commented, f"observer.env: {name} is set; the shipped file keeps the defaults"
        if read[name] is not None:
            assert value == read[name], f"observer.env: {name}={value}, but the default is {read[name]}"
        documented.add(name)
    assert documented == set(read), f"not documented in observer.env: {sorted(set(read) - documented)}"


def manifest() -> list[dict]:
    import yaml  # PyYAML comes with kubernetes-validate

    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc is not None]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifest_validates_against_the_kubernetes_schema(version: str):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is missing: .venv/bin/pip install -r tests/python/requirements.txt")
    docs = manifest()
    assert [d["kind"] for d in docs] == ["Namespace", "ServiceAccount", "DaemonSet", "Service"]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} against {version}: {err.message} at {list(err.path)}")


def test_daemonset_has_what_the_daemon_needs():
    docs = {d["kind"]: d for d in manifest()}
    namespace = docs["Namespace"]["metadata"]["name"]
    for kind in ["ServiceAccount", "DaemonSet", "Service"]:
        assert docs[kind]["metadata"]["namespace"] == namespace, kind

    daemonset = docs["DaemonSet"]
    pod = daemonset["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = pod["spec"]
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["nodeSelector"] and spec["tolerations"]
    [container] = spec["containers"]
    assert container["image"] == "observer:VERSION"
    assert container["command"] == [INSTALLED_BINARY, "run"]

    # The admin server on the node's address, port 9464, and the probes on that port.
    env = {e["name"]: e for e in container["env"]}
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    addr = env["OBSERVER_METRICS_ADDR"]["value"].replace("$(HOST_IP)", "10.1.2.3")
    host, port = addr.rsplit(":", 1)
    assert not ipaddress.ip_address(host).is_loopback and int(port) == ADMIN_PORT
    names = help_options("run")
    for name in env:
        if name.startswith("OBSERVER_"):
            assert name in names, f"the DaemonSet sets {name}, which `observer run` does not read"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": ADMIN_PORT}
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == ADMIN_PORT, probe

    security = container["securityContext"]
    assert security["runAsUser"] == 0 and not security.get("privileged")
    added = set(security["capabilities"]["add"])
    assert {"BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"} <= added and "SYS_ADMIN" not in added
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["memory"]

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["tracefs"]["mountPath"] == "/sys/kernel/tracing" and mounts["tracefs"]["readOnly"]
    assert volumes["tracefs"]["hostPath"]["path"] == "/sys/kernel/tracing"
    assert set(mounts) == set(volumes)

    service = docs["Service"]["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"].items() <= labels.items()
    [service_port] = service["ports"]
    assert service_port["port"] == ADMIN_PORT and ports[service_port["targetPort"]] == ADMIN_PORT
    annotations = docs["Service"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(ADMIN_PORT)
