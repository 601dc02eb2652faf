"""Creates the extender's TLS Secret for the `dev` overlay: a self-signed CA and a serving
certificate for the extender Service's DNS names, stored as `tls.crt`, `tls.key` and `ca.crt`
(the layout cert-manager writes, so base manifests work with either).

Runs as a Job in the extender image (Python, the `kubernetes` client, and the `openssl` CLI that
Debian's ca-certificates package brings). Idempotent: a Secret that already holds a certificate
for these names, signed by its CA and valid for at least RENEW_BEFORE_DAYS more days, is kept.
`--out-dir` writes the files instead of a Secret (to inspect them, or without a cluster).
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when needed: --out-dir runs without the kubernetes client
    from kubernetes import client

VALID_DAYS = 365
RENEW_BEFORE_DAYS = 30
KEYS = ("tls.crt", "tls.key", "ca.crt")


class BootstrapError(RuntimeError):
    """A step that failed, with the command's own message."""


def dns_names(service: str, namespace: str, cluster_domain: str) -> list[str]:
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.{cluster_domain}",
    ]


def _openssl(*args: str, cwd: Path) -> str:
    try:
        done = subprocess.run(
            ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise BootstrapError("the openssl command is not installed in this image") from None
    if done.returncode != 0:
        raise BootstrapError(f"openssl {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def generate(names: list[str], workdir: Path) -> dict[str, bytes]:
    """A fresh CA (EC P-256) and a serving certificate for `names`, signed by it."""
    cn = names[2] if len(names) > 2 else names[0]
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=workdir)
    _openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", str(VALID_DAYS),
        "-subj", f"/CN=copack-dev-ca ({cn})",
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", "ca.crt", cwd=workdir,
    )  # fmt: skip
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ec.key", cwd=workdir)
    # PKCS#8, which every TLS stack (uvicorn/ssl, Go) loads.
    _openssl("pkcs8", "-topk8", "-nocrypt", "-in", "ec.key", "-out", "tls.key", cwd=workdir)
    _openssl("req", "-new", "-key", "tls.key", "-subj", f"/CN={cn}", "-out", "tls.csr", cwd=workdir)
    san = ",".join(f"DNS:{n}" for n in names)
    (workdir / "ext.cnf").write_text(
        f"subjectAltName={san}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-sha256", "-days", str(VALID_DAYS), "-extfile", "ext.cnf",
        "-out", "tls.crt", cwd=workdir,
    )  # fmt: skip
    return {k: (workdir / k).read_bytes() for k in KEYS}


def still_good(files: dict[str, bytes], names: list[str], workdir: Path) -> bool:
    """True when the certificate chains to the CA, covers every name and outlives the margin."""
    if any(not files.get(k) for k in KEYS):
        return False
    for k in KEYS:
        (workdir / f"old-{k}").write_bytes(files[k])
    try:
        _openssl("verify", "-CAfile", "old-ca.crt", "old-tls.crt", cwd=workdir)
        _openssl(
            "x509", "-in", "old-tls.crt", "-noout",
            "-checkend", str(RENEW_BEFORE_DAYS * 86400), cwd=workdir,
        )  # fmt: skip
        text = _openssl("x509", "-in", "old-tls.crt", "-noout", "-ext", "subjectAltName",
                        cwd=workdir)  # fmt: skip
    except BootstrapError:
        return False
    return all(f"DNS:{n}" in text for n in names)


def _core_api(kubeconfig: str | None) -> client.CoreV1Api:
    from kubernetes import client, config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()
    return client.CoreV1Api()


def ensure_secret(
    namespace: str, name: str, names: list[str], kubeconfig: str | None, workdir: Path
) -> str:
    """Keeps a Secret that is still good, else creates or replaces it; says which it did."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = _core_api(kubeconfig)
    existing = None
    try:
        existing = api.read_namespaced_secret(name, namespace)
    except ApiException as e:
        if e.status != 404:
            raise BootstrapError(
                f"reading secret {namespace}/{name}: {e.status} {e.reason}"
            ) from None
    if existing is not None:
        old = {k: base64.b64decode(v) for k, v in (existing.data or {}).items()}
        if still_good(old, names, workdir):
            return "kept"
    files = generate(names, workdir)
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels={
                "app.kubernetes.io/part-of": "copack",
                "app.kubernetes.io/managed-by": "copack-tls-bootstrap",
            },
        ),
        type="kubernetes.io/tls",
        data={k: base64.b64encode(files[k]).decode() for k in KEYS},
    )
    try:
        if existing is None:
            api.create_namespaced_secret(namespace, body)
            return "created"
        body.metadata.resource_version = existing.metadata.resource_version
        api.replace_namespaced_secret(name, namespace, body)
        return "replaced"
    except ApiException as e:
        raise BootstrapError(f"writing secret {namespace}/{name}: {e.status} {e.reason}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "copack-system"))
    p.add_argument("--service", default="copack-extender")
    p.add_argument("--secret", default="copack-extender-tls")
    p.add_argument("--cluster-domain", default="cluster.local")
    p.add_argument("--kubeconfig", default=None, help="default: in-cluster service account")
    p.add_argument("--out-dir", type=Path, default=None, help="write files here, no cluster")
    a = p.parse_args(argv)
    names = dns_names(a.service, a.namespace, a.cluster_domain)
    try:
        with tempfile.TemporaryDirectory(prefix="copack-tls-") as tmp:
            work = Path(tmp)
            if a.out_dir is not None:
                a.out_dir.mkdir(parents=True, exist_ok=True)
                old = {k: (a.out_dir / k).read_bytes() for k in KEYS if (a.out_dir / k).exists()}
                if still_good(old, names, work):
                    print(f"kept the certificate in {a.out_dir} for {', '.join(names)}")
                    return 0
                for k, v in generate(names, work).items():
                    (a.out_dir / k).write_bytes(v)
                    if k == "tls.key":
                        (a.out_dir / k).chmod(0o600)
                print(f"wrote {', '.join(KEYS)} to {a.out_dir} for {', '.join(names)}")
                return 0
            what = ensure_secret(a.namespace, a.secret, names, a.kubeconfig, work)
            print(f"{what} secret {a.namespace}/{a.secret} for {', '.join(names)}")
            return 0
    except BootstrapError as e:
        print(f"tls-bootstrap: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
