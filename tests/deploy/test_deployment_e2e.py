"""The agent (with its device plugin) and the extender, started the way the rendered manifests
start them (same commands and flags, the extender's config from its ConfigMap, the agent's
identity from the DaemonSet's env), against the fake API server, the fake NVML library and the
fake kubelet (device-plugin registration, admission, pod-resources). Then the whole chain of
DESIGN.md, driven from the outside:

- kube-scheduler's calls: filter, prioritize and bind at `urlPrefix/<verb>` from the
  KubeSchedulerConfiguration, over HTTPS verified with its caFile and serverName;
- the kubelet admits the bound pod: the device plugin hands it the unit the extender chose;
- RBAC: every request each component sent the API server (told apart by their bearer tokens)
  is allowed by its role, and was found by the static scan of test_rbac.py;
- the dashboard: every metric it queries is in the agent's or the extender's /metrics, with the
  labels it groups and filters by.

Only the listen addresses differ from the manifests (loopback, ephemeral ports, so tests can
run side by side), and the NVML library, which the NVIDIA runtime would mount."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from policies.inventory import AGENT_ANNOTATION, GPU_RESOURCE, SCHEDULER_NAME, UNIT_ANNOTATION
from tests.deploy.dashboard import family, queries
from tests.deploy.manifests import REPO, one, pod_spec, render
from tests.deploy.rbac_calls import Permission, required, scan_component
from tests.deploy.test_dev_tls import bootstrap
from tests.deploy.test_rbac import granted
from tests.deploy.test_scheduler_config import scheduler_config
from tests.fakes import nvml as fake_nvml
from tests.fakes.kube_apiserver import FakeKubeApiServer
from tests.fakes.kubelet import FakeKubelet, KubeletPod

pytestmark = pytest.mark.slow

NODE = "gpu-node-1"
TOKENS = {"copack-extender": "extender-token", "copack-agent": "agent-token"}
T = TypeVar("T")


def wait_until(fn: Callable[[], T | None], what: str, timeout: float = 60.0,
               logs: tuple[Path, ...] = ()) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def _copack() -> list[str]:
    exe = Path(sys.executable).parent / "copack"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "copack.cli"]


class Stack:
    """The running processes and what the test needs to reach them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kubelet: FakeKubelet | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.objs = render("base")
        self.sched = scheduler_config(self.objs)["extenders"][0]
        self.ca = root / "tls" / "ca.crt"

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as out:
            self.procs[name] = subprocess.Popen(
                [*_copack(), *args], stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            )

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes[name] = None
        return codes


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Any]]:
    root = tmp_path_factory.mktemp("e2e")
    st = Stack(root)
    server = FakeKubeApiServer().start()
    kubelet = None
    try:
        server.add_node(NODE, labels={"nvidia.com/gpu.present": "true"})
        kubeconfigs = {a: server.write_kubeconfig(root / f"{a}.kubeconfig", token=t)
                       for a, t in TOKENS.items()}
        nv = fake_nvml.FakeNvml(root / "nvml", fake_nvml.scenario(
            [fake_nvml.gpu("H100", 0, gpm=fake_nvml.gpm(sm=35, tensor=25))]))
        plugin_dir, sock = root / "device-plugins", root / "pod-resources" / "kubelet.sock"
        kubelet = FakeKubelet(plugin_dir, sock, kube_server=server).start()
        st.kubelet = kubelet

        # The agent: the DaemonSet's command; NODE_NAME and POD_IP as the downward API sets them.
        ds = pod_spec(one(st.objs, "DaemonSet", "copack-agent"))["containers"][0]
        env_names = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
                     for e in ds["env"] if "valueFrom" in e}
        assert env_names == {"NODE_NAME": "spec.nodeName", "POD_IP": "status.podIP"}
        plain_env = {e["name"]: e["value"] for e in ds["env"] if "value" in e}
        assert "--device-plugin" in ds["args"]
        st.start("agent", [*ds["args"], "--interval", "0.2", "--grpc-listen", "127.0.0.1:0",
                           "--metrics-listen", "127.0.0.1:0", "--nvml-library", str(nv.lib_path),
                           "--kubeconfig", str(kubeconfigs["copack-agent"]),
                           "--device-plugin-dir", str(plugin_dir),
                           "--pod-resources-socket", str(sock), "--pod-refresh", "0.5"],
                 {**nv.env(), **plain_env, "NODE_NAME": NODE, "POD_IP": "127.0.0.1"})

        # The extender: the Deployment's command and its ConfigMap's config, with the TLS
        # files the Secret would hold (made by the dev overlay's bootstrap).
        dep = pod_spec(one(st.objs, "Deployment", "copack-extender"))
        (c,) = dep["containers"]
        config_path = c["args"][c["args"].index("--config") + 1]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in dep["volumes"]}
        d, f = config_path.rsplit("/", 1)
        cm = one(st.objs, "ConfigMap", volumes[mounts[d]]["configMap"]["name"])
        config = yaml.safe_load(cm["data"][f])
        certs = root / "tls"
        assert bootstrap(certs).returncode == 0
        config["tls"] = {"cert_file": str(certs / "tls.crt"), "key_file": str(certs / "tls.key")}
        (root / "extender.yaml").write_text(yaml.safe_dump(config))
        args = [a if a != config_path else str(root / "extender.yaml") for a in c["args"]]
        st.start("extender", [*args, "--host", "127.0.0.1", "--port", "0",
                              "--kubeconfig", str(kubeconfigs["copack-extender"])], {})
        assert st.ca == certs / "ca.crt"
        yield st, server
    finally:
        codes = st.stop()
        if kubelet is not None:
            kubelet.stop()
        server.stop()
        assert all(c is not None for c in codes.values()), "a process ignored SIGTERM"


def _ports(st: Stack) -> tuple[int, int, int]:
    logs = tuple(st.logs.values())
    agent = wait_until(lambda: re.search(r"advertised [^)]*:(\d+)\), metrics :(\d+)",
                                         st.logs["agent"].read_text()), "the agent", logs=logs)
    ext = wait_until(lambda: re.search(r"listening on https://[^:]+:(\d+)",
                                       st.logs["extender"].read_text()), "the extender", logs=logs)
    return int(agent[1]), int(agent[2]), int(ext[1])


def _scheduler_client(st: Stack, port: int) -> tuple[httpx.Client, str]:
    """An HTTPS client that trusts what kube-scheduler trusts (caFile) and checks the name
    kube-scheduler checks (serverName), connected to the extender's loopback port."""
    tls = st.sched["tlsConfig"]
    ctx = ssl.create_default_context(cafile=str(st.ca))
    url = urlparse(st.sched["urlPrefix"])
    assert url.hostname == tls["serverName"]
    client = httpx.Client(verify=ctx, timeout=10.0)
    base = f"https://127.0.0.1:{port}{url.path}".rstrip("/")
    return client, base


def _post(client: httpx.Client, base: str, verb: str, body: dict, st: Stack) -> Any:
    r = client.post(f"{base}/{verb}", json=body,
                    extensions={"sni_hostname": st.sched["tlsConfig"]["serverName"]})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def scheduled(stack) -> dict[str, Any]:
    """Schedule one pod the way kube-scheduler would, then admit it the way the kubelet would."""
    st, server = stack
    ext_port = _ports(st)[2]
    client, base = _scheduler_client(st, ext_port)
    with client:
        out = _scheduler_flow(st, server, client, base, ext_port)
    assert st.kubelet.wait_registered(timeout=60), st.logs["agent"].read_text()[-3000:]
    out["devices"] = st.kubelet.devices()
    out["admission"] = st.kubelet.admit(KubeletPod.from_api(out["bound"]))
    return out


def _scheduler_flow(st: Stack, server: Any, client: httpx.Client, base: str,
                    ext_port: int) -> dict[str, Any]:
    sni = {"sni_hostname": st.sched["tlsConfig"]["serverName"]}
    logs = tuple(st.logs.values())
    wait_until(lambda: client.get(f"{base}/readyz", extensions=sni).status_code == 200,
               "the extender's /readyz over verified HTTPS", logs=logs)
    # The verification is real: another name is refused (a new client: a pooled connection
    # would not handshake again).
    other, _ = _scheduler_client(st, ext_port)
    with other, pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
        other.get(f"{base}/readyz", extensions={"sni_hostname": "copack-extender.elsewhere.svc"})
    wait_until(lambda: (server.get("nodes", NODE)["metadata"].get("annotations") or {}).get(
        AGENT_ANNOTATION), "the agent's node annotations", logs=logs)
    wait_until(lambda: 'copack_extender_units{state="fresh"} 1.0' in client.get(
        f"{base}/metrics", extensions=sni).text, "fresh telemetry in the extender", logs=logs)

    server.add_pod({
        "metadata": {"name": "decode-0", "namespace": "llm",
                     "annotations": {"copack.io/role": "decode",
                                     "copack.io/demand": "sm=0.2,bw=0.3,mem=10Gi"}},
        "spec": {"schedulerName": SCHEDULER_NAME, "containers": [
            {"name": "vllm", "image": "vllm", "resources": {"limits": {GPU_RESOURCE: "1"}}}]},
    })
    pod = server.get("pods", "decode-0", "llm")
    assert st.sched["nodeCacheCapable"] is True  # so NodeNames, not Nodes
    args = {"Pod": pod, "Nodes": None, "NodeNames": [NODE]}
    return {
        "filter": _post(client, base, st.sched["filterVerb"], args, st),
        "prioritize": _post(client, base, st.sched["prioritizeVerb"], args, st),
        "bind": _post(client, base, st.sched["bindVerb"],
                      {"PodName": "decode-0", "PodNamespace": "llm",
                       "PodUID": pod["metadata"]["uid"], "Node": NODE}, st),
        "bound": server.get("pods", "decode-0", "llm"),
    }


def test_scheduler_calls_place_the_pod_on_the_unit(scheduled) -> None:
    assert scheduled["filter"]["NodeNames"] == [NODE], scheduled["filter"]
    assert [s["Host"] for s in scheduled["prioritize"]] == [NODE]
    assert scheduled["bind"].get("Error", "") == "", scheduled["bind"]
    bound = scheduled["bound"]
    assert bound["spec"]["nodeName"] == NODE
    assert bound["metadata"]["annotations"][UNIT_ANNOTATION] == fake_nvml.gpu_uuid(0)


def test_kubelet_admission_gives_the_container_the_chosen_unit(scheduled) -> None:
    unit = scheduled["bound"]["metadata"]["annotations"][UNIT_ANNOTATION]
    # The device plugin advertises slots of the one unit (the CLI's default 4 per unit).
    assert {d.split("::")[0] for d in scheduled["devices"]} == {unit}
    adm = scheduled["admission"]
    assert adm.admitted, adm.error
    assert adm.env["NVIDIA_VISIBLE_DEVICES"] == unit


def test_every_api_request_is_within_its_accounts_role(stack, scheduled) -> None:
    """Told apart by bearer token; the device plugin's requests (during admission) included."""
    st, server = stack
    seen: dict[str, set[Permission]] = {a: set() for a in TOKENS}
    for rec in server.requests:
        accounts = [a for a, t in TOKENS.items() if rec.authorization == f"Bearer {t}"]
        assert accounts, f"a request from nobody we started: {rec.method} {rec.path}"
        if rec.resource is None:  # discovery (/api, /version): allowed to every account
            continue
        resource = rec.resource + (f"/{rec.subresource}" if rec.subresource else "")
        group = rec.path.split("/")[2] if rec.path.startswith("/apis/") else ""
        seen[accounts[0]].add(Permission(group, resource, rec.verb))
    assert Permission("", "pods/binding", "create") in seen["copack-extender"]
    assert Permission("coordination.k8s.io", "leases", "create") in seen["copack-extender"]
    assert Permission("", "nodes", "patch") in seen["copack-agent"]
    assert Permission("", "pods", "watch") in seen["copack-agent"]  # the device plugin's
    for account, perms in seen.items():
        allowed = granted(st.objs, account)
        assert perms <= allowed, f"{account} made calls its role denies: {perms - allowed}"
        static = required(scan_component(REPO, {"copack-extender": "extender",
                                                "copack-agent": "node_agent"}[account])[0])
        assert perms <= static, f"{account}: the static scan missed {perms - static}"


def _families(text: str) -> dict[str, set[str]]:
    """Exposed series name -> label names seen on it; families without samples map to {}."""
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        names = {fam.name, f"{fam.name}_total"} if fam.type == "counter" else {fam.name}
        for n in names:
            out.setdefault(n, set())
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def test_dashboard_queries_find_their_metrics_and_labels(stack, scheduled) -> None:
    st, _ = stack
    _, metrics_port, ext_port = _ports(st)
    client, base = _scheduler_client(st, ext_port)
    sni = {"sni_hostname": st.sched["tlsConfig"]["serverName"]}
    logs = tuple(st.logs.values())
    agent_text = wait_until(
        lambda: (t := httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text)
        and "copack_gpu_unit_pod_info{" in t and t, "pod attribution in the agent", logs=logs)
    exposed = _families(agent_text)
    with client:
        exposed.update(_families(client.get(f"{base}/metrics", extensions=sni).text))
    problems = []
    for q in queries():
        names = q.metrics()
        for m in names:
            if m not in exposed and family(m) not in exposed:
                problems.append(f"{q.panel}: {m} not exported")
        labels = set().union(*(exposed.get(m, set()) for m in names))
        if labels:  # a family with no samples yet (e.g. no watch restarts) has none to check
            missing = q.grouping_labels() - labels
            if missing:
                problems.append(f"{q.panel}: labels {sorted(missing)} not on {sorted(names)}")
    assert not problems, "\n".join(problems)


def test_both_stop_cleanly_on_sigterm(stack) -> None:
    st, _ = stack
    _ports(st)
    # (Every HTTPS client above is closed first. One left open and idle delays the extender's
    # exit by asyncio's 30 s TLS shutdown timeout, as the e2e run showed: a Go client such as
    # kube-scheduler answers close_notify at once.)
    codes = st.stop()
    # Clean means exit 0, or -SIGTERM from uvicorn, which after its graceful shutdown re-raises
    # the signal it captured (uvicorn.Server.capture_signals). Not clean: still running after
    # 30 s, kubelet's default grace period (then stop() kills it and reports None).
    assert codes["agent"] == 0 and codes["extender"] in (0, -signal.SIGTERM), {
        n: p.read_text()[-2000:] for n, p in st.logs.items()}
