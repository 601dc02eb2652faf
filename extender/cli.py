"""Subcommands of `copack` contributed by `extender`: `extender serve` and `explain`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

extender_app = typer.Typer(help="The kube-scheduler extender.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@extender_app.command("serve")
def serve(
    config: Annotated[Path | None, typer.Option("--config", help="YAML configuration file")] = None,
    kubeconfig: Annotated[
        str | None, typer.Option("--kubeconfig", help="kubeconfig (default: in-cluster config)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="listen address")] = None,
    port: Annotated[int | None, typer.Option(help="listen port")] = None,
    policy: Annotated[
        str | None, typer.Option(help="complementary | spread | binpack | dedicated")
    ] = None,
    overcommit: Annotated[float | None, typer.Option(help="allowed sm/bw load over 1.0")] = None,
    stale_after: Annotated[
        float | None, typer.Option("--stale-after", help="telemetry staleness bound (s)")
    ] = None,
    assumed_window: Annotated[
        float | None, typer.Option("--assumed-window", help="assumed-placement window (s)")
    ] = None,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="HTTPS certificate")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="HTTPS private key")] = None,
    no_telemetry: Annotated[
        bool, typer.Option("--no-telemetry", help="do not subscribe to node agents")
    ] = False,
    leader_elect: Annotated[
        bool | None,
        typer.Option("--leader-elect/--no-leader-elect",
                     help="elect one leader among the replicas through a Lease"),
    ] = None,
    lease_name: Annotated[
        str | None, typer.Option("--lease-name", help="the leader Lease's name")
    ] = None,
    lease_namespace: Annotated[
        str | None, typer.Option("--lease-namespace", help="the leader Lease's namespace")
    ] = None,
    leader_identity: Annotated[
        str | None,
        typer.Option("--leader-identity", help="this replica's identity (default: $POD_NAME, "
                     "else the hostname)"),
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-example-config", help="print a commented config and exit")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Run the extender: watch the cluster, follow agent telemetry, answer kube-scheduler."""
    from extender.config import EXAMPLE_CONFIG, ConfigError, load_config

    if print_config:
        typer.echo(EXAMPLE_CONFIG, nl=False)
        return
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(config).with_overrides(
            {
                "kube.kubeconfig": kubeconfig,
                "listen.host": host,
                "listen.port": port,
                "policy.policy": policy,
                "policy.overcommit": overcommit,
                "policy.stale_after_s": stale_after,
                "policy.assumed_window_s": assumed_window,
                "tls.cert_file": tls_cert,
                "tls.key_file": tls_key,
                "telemetry.enabled": False if no_telemetry else None,
                "leader_election.enabled": leader_elect,
                "leader_election.lease_name": lease_name,
                "leader_election.lease_namespace": lease_namespace,
                "leader_election.identity": leader_identity,
            }
        )
    except ConfigError as e:
        _fail(str(e))
        return
    from extender.serve import ExtenderService

    try:
        service = ExtenderService(cfg)
    except Exception as e:  # kubeconfig unreadable, not in a cluster
        _fail(f"cannot reach the Kubernetes API: {type(e).__name__}: {e}")
        return
    service.run()


def explain(
    pod: Annotated[str, typer.Argument(help="NAMESPACE/POD (namespace defaults to 'default')")],
    url: Annotated[str, typer.Option(help="the extender's base URL")] = "http://127.0.0.1:8888",
    cacert: Annotated[
        str | None, typer.Option(help="CA bundle for an HTTPS extender")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds")] = 5.0,
    rebalancer_url: Annotated[
        str | None,
        typer.Option("--rebalancer-url", help="copack-rebalancer's base URL (its metrics port): "
                     "also show whether and why it evicted the pod"),
    ] = None,
) -> None:
    """Ask a running extender why it placed (or refused) a pod; with --rebalancer-url, also ask
    the rebalancer why it evicted the pod (or kept its GPU)."""
    import ssl

    import httpx
    import orjson

    ns, _, name = pod.rpartition("/")
    ns = ns or "default"
    if not name or "/" in ns:
        _fail(f"{pod!r} is not NAMESPACE/POD")

    def ask(base: str, what: str, verify: ssl.SSLContext | bool) -> tuple[bool, object]:
        """(answered 200, the JSON body or an error message)."""
        target = f"{base.rstrip('/')}/explain/{ns}/{name}"
        try:
            r = httpx.get(target, timeout=timeout, verify=verify)
        except (httpx.HTTPError, OSError) as e:
            return False, f"cannot reach the {what} at {base}: {e}"
        try:
            body = r.json()
        except ValueError:
            return False, f"{target} answered {r.status_code} with a non-JSON body"
        if r.status_code != 200:
            return False, body.get("Error") if isinstance(body, dict) else str(body)
        return True, body

    try:
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=cacert) if cacert else True
        )
    except OSError as e:  # an unreadable --cacert
        _fail(f"cannot reach the extender at {url}: {e}", 1)
        return
    ok, body = ask(url, "extender", verify)
    if rebalancer_url is None:
        if not ok:
            _fail(str(body), 1)
        typer.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
        return
    r_ok, r_body = ask(rebalancer_url, "rebalancer", True)
    if not ok and not r_ok:
        _fail(f"extender: {body}; rebalancer: {r_body}", 1)
    out = {
        "extender": body if ok else {"Error": body},
        "rebalancer": r_body if r_ok else {"Error": r_body},
    }
    typer.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    if r_ok and isinstance(r_body, dict) and r_body.get("action") in ("evicted", "dry_run"):
        verb = "evicted" if r_body["action"] == "evicted" else "would evict (dry run)"
        typer.echo(f"copack-rebalancer {verb} {ns}/{name}: {r_body.get('reason')}")


def register(app: typer.Typer) -> None:
    """Add this component's commands to the top-level app."""
    app.add_typer(extender_app, name="extender")
    app.command("explain")(explain)
