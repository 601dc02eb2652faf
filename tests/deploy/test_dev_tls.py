"""The dev overlay's TLS bootstrap (deploy/overlays/dev/tls_bootstrap.py) makes a CA and a
serving certificate that a TLS client configured like kube-scheduler (caFile + serverName from
the KubeSchedulerConfiguration) accepts, and that the extender's config loader accepts."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import DEPLOY, one, render
from tests.deploy.test_scheduler_config import scheduler_config

SCRIPT = DEPLOY / "overlays" / "dev" / "tls_bootstrap.py"


def bootstrap(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(out), *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls")
    done = bootstrap(out)
    assert done.returncode == 0, done.stderr
    return out


def _serve_once(certs: Path) -> tuple[int, threading.Thread, list[str]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[str] = []

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
                    seen.append("handshake")
            except (ssl.SSLError, OSError) as e:
                seen.append(f"refused: {e}")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return port, t, seen


def _connect(port: int, ca: Path, server_name: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))  # verifies chain and hostname
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(
        raw, server_hostname=server_name
    ) as tls:
        return tls.recv(2)


def test_a_client_configured_like_kube_scheduler_verifies_the_extender(certs: Path) -> None:
    (ext,) = scheduler_config(render("overlays/dev"))["extenders"]
    port, t, seen = _serve_once(certs)
    assert _connect(port, certs / "ca.crt", ext["tlsConfig"]["serverName"]) == b"ok"
    t.join(10)
    assert seen == ["handshake"]


def test_a_wrong_server_name_or_ca_is_refused(certs: Path, tmp_path: Path) -> None:
    port, t, _ = _serve_once(certs)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"match|mismatch"):
        _connect(port, certs / "ca.crt", "copack-extender.other-namespace.svc")
    t.join(10)
    other = tmp_path / "other"
    assert bootstrap(other).returncode == 0
    port, t, _ = _serve_once(certs)
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(port, other / "ca.crt", "copack-extender.copack-system.svc")
    t.join(10)


def test_certificate_is_a_server_leaf_for_every_service_name(certs: Path) -> None:
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "tls.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    for name in ("copack-extender", "copack-extender.copack-system",
                 "copack-extender.copack-system.svc",
                 "copack-extender.copack-system.svc.cluster.local"):
        assert f"DNS:{name}" in text
    assert "TLS Web Server Authentication" in text
    assert "CA:FALSE" in text
    assert (certs / "tls.key").stat().st_mode & 0o077 == 0


def test_rerun_keeps_a_good_certificate_and_replaces_a_bad_one(tmp_path: Path) -> None:
    assert bootstrap(tmp_path).returncode == 0
    first = (tmp_path / "tls.crt").read_bytes()
    done = bootstrap(tmp_path)
    assert done.returncode == 0 and "kept" in done.stdout
    assert (tmp_path / "tls.crt").read_bytes() == first
    # A certificate for other names (another namespace) is not kept.
    done = bootstrap(tmp_path, "--namespace", "elsewhere")
    assert done.returncode == 0 and "wrote" in done.stdout
    assert (tmp_path / "tls.crt").read_bytes() != first
    # Nor one whose CA does not sign it.
    (tmp_path / "ca.crt").write_bytes((tmp_path / "tls.crt").read_bytes())
    done = bootstrap(tmp_path, "--namespace", "elsewhere")
    assert "wrote" in done.stdout


def test_missing_openssl_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out-dir", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": str(tmp_path)},  # no openssl on it
    )
    assert done.returncode == 1
    assert "openssl command is not installed" in done.stderr
    assert "Traceback" not in done.stderr


def test_job_runs_the_script_from_its_configmap_with_matching_arguments() -> None:
    objs = render("overlays/dev")
    job = one(objs, "Job", "copack-tls-bootstrap")
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    script_path = c["command"][-1]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    directory, filename = script_path.rsplit("/", 1)
    volume = {v["name"]: v for v in spec["volumes"]}[mounts[directory]]
    cm = one(objs, "ConfigMap", volume["configMap"]["name"])
    assert cm["data"][filename] == SCRIPT.read_text()
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    svc = one(objs, "Service", "copack-extender")
    assert args == {"namespace": svc["metadata"]["namespace"],
                    "service": svc["metadata"]["name"], "secret": "copack-extender-tls"}
    # Its Role: create Secrets, read/replace only that one.
    role = one(objs, "Role", "copack-tls-bootstrap")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["copack-extender-tls"],
         "verbs": ["get", "update"]},
    ]


def test_extender_config_in_the_configmap_is_accepted_by_the_extender(certs: Path) -> None:
    from extender.config import validate_config

    objs = render("base")
    dep = one(objs, "Deployment", "copack-extender")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    config_path = c["args"][c["args"].index("--config") + 1]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    directory, filename = config_path.rsplit("/", 1)
    volumes = {v["name"]: v for v in spec["volumes"]}
    cm = one(objs, "ConfigMap", volumes[mounts[directory]["name"]]["configMap"]["name"])
    data = yaml.safe_load(cm["data"][filename])
    # The TLS files it names are the Secret's, mounted where it says.
    for field, secret_key in (("cert_file", "tls.crt"), ("key_file", "tls.key")):
        d, f = data["tls"][field].rsplit("/", 1)
        vol = volumes[mounts[d]["name"]]
        assert {"key": secret_key, "path": f} in vol["secret"]["items"]
        data["tls"][field] = str(certs / secret_key)  # the real files, for the loader's check
    cfg = validate_config(data, source="extender-config.yaml")
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "https")
    assert cfg.listen.port == port
    assert cfg.tls.enabled


def test_job_role_grants_exactly_the_scripts_api_calls() -> None:
    from tests.deploy.rbac_calls import Permission, required, scan_source

    calls, unresolved = scan_source(SCRIPT.read_text(), SCRIPT.name)
    assert not unresolved
    assert required(calls) == {Permission("", "secrets", v) for v in ("get", "create", "update")}
    role = one(render("overlays/dev"), "Role", "copack-tls-bootstrap")
    granted = {(v, tuple(r.get("resourceNames", ()))) for r in role["rules"] for v in r["verbs"]}
    # create cannot be limited by name; get and update only for the Secret the Job writes.
    assert granted == {("create", ()), ("get", ("copack-extender-tls",)),
                       ("update", ("copack-extender-tls",))}


def _run_against(server, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--kubeconfig", str(kubeconfig)],
        capture_output=True, text=True, timeout=60, check=False,
    )


SECRET_PATH = "/api/v1/namespaces/copack-system/secrets/copack-extender-tls"


def test_the_job_creates_keeps_and_replaces_the_secret(tmp_path: Path) -> None:
    """Through the official client against the fake API server: the first run creates the
    Secret, a rerun keeps it (the Job runs on every apply), and one holding a certificate that
    no longer fits is replaced in place (resourceVersion precondition)."""
    import base64

    from tests.fakes.kube_apiserver import FakeKubeApiServer

    with FakeKubeApiServer() as server:
        done = _run_against(server, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "created secret copack-system/copack-extender-tls" in done.stdout
        secret = server.get("secrets", "copack-extender-tls", "copack-system")
        assert secret["type"] == "kubernetes.io/tls"
        assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
        files = tmp_path / "files"
        files.mkdir()
        for k, v in secret["data"].items():
            (files / k).write_bytes(base64.b64decode(v))
        # What it stored is a certificate kube-scheduler's client accepts.
        port, t, seen = _serve_once(files)
        assert _connect(port, files / "ca.crt", "copack-extender.copack-system.svc") == b"ok"
        t.join(10)
        assert seen == ["handshake"]

        done = _run_against(server, tmp_path)
        assert done.returncode == 0 and "kept secret" in done.stdout, done.stderr
        assert server.get("secrets", "copack-extender-tls", "copack-system") == secret

        # A CA that did not sign the certificate (someone replaced part of it): not kept.
        server.patch("secrets", "copack-extender-tls",
                     {"data": {"ca.crt": secret["data"]["tls.crt"]}}, "copack-system", "merge")
        done = _run_against(server, tmp_path)
        assert done.returncode == 0 and "replaced secret" in done.stdout, done.stderr
        now = server.get("secrets", "copack-extender-tls", "copack-system")
        assert now["metadata"]["uid"] == secret["metadata"]["uid"]
        assert now["data"]["tls.crt"] != secret["data"]["tls.crt"]
        methods = [(r.method, r.path) for r in server.requests if "secrets" in r.path]
    assert methods == [
        ("GET", SECRET_PATH),
        ("POST", "/api/v1/namespaces/copack-system/secrets"),
        ("GET", SECRET_PATH),
        ("GET", SECRET_PATH),
        ("PUT", SECRET_PATH),
    ]


def test_an_api_server_that_refuses_gives_a_one_line_error(tmp_path: Path) -> None:
    """A refused write (RBAC missing, say): the script says which call failed and exits 1,
    without a traceback."""
    from tests.fakes.kube_apiserver import FakeKubeApiServer

    with FakeKubeApiServer() as server:
        server.fail_next("create", status=403, resource="secrets", reason="Forbidden")
        done = _run_against(server, tmp_path)
        methods = [(r.method, r.path) for r in server.requests]
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "writing secret copack-system/copack-extender-tls: 403" in done.stderr
    assert methods == [
        ("GET", SECRET_PATH),
        ("POST", "/api/v1/namespaces/copack-system/secrets"),
    ]
