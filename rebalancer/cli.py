"""`copack rebalance`: the re-packing controller (rebalancer/README.md)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated

import orjson
import typer


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def rebalance(
    kubeconfig: Annotated[
        str | None, typer.Option("--kubeconfig", help="kubeconfig (default: in-cluster config)")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="the extender's YAML configuration, for its policy "
                     "section (plan with the policy the extender places with)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only report what would be evicted")
    ] = False,
    interval_s: Annotated[
        float, typer.Option("--interval-s", help="seconds between rounds")
    ] = 60.0,
    evictions_per_minute: Annotated[
        int, typer.Option("--evictions-per-minute", help="per workload")
    ] = 1,
    min_age_s: Annotated[
        float, typer.Option("--min-age-s", help="never evict a pod Ready for less (warm-up)")
    ] = 300.0,
    max_gpus_per_round: Annotated[
        int, typer.Option("--max-gpus-per-round", help="GPUs emptied by one round at most")
    ] = 2,
    grace_s: Annotated[
        float, typer.Option("--grace-s", help="evicted pods' termination grace period (s)")
    ] = 30.0,
    settle_timeout_s: Annotated[
        float, typer.Option("--settle-timeout-s",
                            help="a workload whose replacement never turns Ready may move "
                            "again after this long")
    ] = 900.0,
    metrics_host: Annotated[str, typer.Option("--metrics-host", help="listen address")] = (
        "0.0.0.0"),
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", help="/metrics, /healthz, /explain (0: any free)")
    ] = 9402,
    once: Annotated[
        bool, typer.Option("--once", help="sync, plan and act one round, print it as JSON, exit")
    ] = False,
    sync_timeout_s: Annotated[
        float, typer.Option("--sync-timeout-s", help="--once: how long to wait for the sync")
    ] = 60.0,
    no_telemetry: Annotated[
        bool, typer.Option("--no-telemetry", help="do not subscribe to node agents")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Re-pack running pods to empty whole GPUs, by the Eviction API, within a budget."""
    from extender.config import ConfigError, load_config
    from rebalancer.budget import BudgetSpec
    from rebalancer.controller import ControllerConfig

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        _fail(f"--log-level: {log_level!r} is not one of debug, info, warning")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= metrics_port < 65536:
        _fail(f"--metrics-port: {metrics_port} is not a port (0-65535)")
    if sync_timeout_s <= 0:
        _fail("--sync-timeout-s must be positive")
    try:
        policy = load_config(config).policy_config()
    except ConfigError as e:
        _fail(str(e))
        return
    try:
        spec = BudgetSpec(evictions_per_minute=evictions_per_minute, min_age_s=min_age_s,
                          max_gpus_per_round=max_gpus_per_round, interval_s=interval_s,
                          grace_s=grace_s)
        ctl = ControllerConfig(budget=spec, dry_run=dry_run, settle_timeout_s=settle_timeout_s)
    except ValueError as e:
        _fail(f"budget: {e}")
        return
    from rebalancer.service import RebalancerService

    try:
        service = RebalancerService(ctl, policy, kubeconfig=kubeconfig,
                                    telemetry=not no_telemetry, metrics_host=metrics_host,
                                    metrics_port=None if once else metrics_port)
    except OSError as e:  # the metrics port is taken
        _fail(f"cannot listen on {metrics_host}:{metrics_port}: {e.strerror or e}")
        return
    except Exception as e:  # kubeconfig unreadable, not in a cluster
        _fail(f"cannot reach the Kubernetes API: {type(e).__name__}: {e}")
        return
    service.start()
    try:
        if once:
            try:
                report = service.once(sync_timeout_s)
            except TimeoutError as e:
                _fail(f"{e} (is the API server reachable?)", 1)
                return
            typer.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: service.request_stop())
        logging.getLogger("copack.rebalancer").info(
            "rebalancer%s: metrics on %s:%d, a round every %.0f s", " (dry run)" if dry_run
            else "", metrics_host, service.server.port if service.server else 0, interval_s)
        service.run_forever()
    finally:
        service.stop()


def register(app: typer.Typer) -> None:
    """Add this component's command to the top-level app."""
    app.command("rebalance")(rebalance)
