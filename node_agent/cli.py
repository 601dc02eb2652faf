"""Subcommands of `copack` contributed by `node_agent`: `copack agent run`."""

from __future__ import annotations

import logging
import signal
import threading

import typer

from node_agent.pod_attribution import DEFAULT_SOCKET


def register(app: typer.Typer) -> None:
    """Add this component's commands to the top-level app."""
    agent_app = typer.Typer(help="The node agent (DaemonSet): NVML telemetry and inventory.",
                            no_args_is_help=True)

    @agent_app.command("run")
    def run(
        node: str = typer.Option(None, help="Node name (default: $NODE_NAME, else the hostname)."),
        interval: float = typer.Option(1.0, help="Sampling interval in seconds (min 0.1)."),
        ewma_halflife: float = typer.Option(10.0, help="EWMA half-life in seconds."),
        window: float = typer.Option(60.0, help="Window for the p95 in seconds."),
        rescan_interval: float = typer.Option(
            30.0,
            help="Full re-enumeration at least this often (s); re-partitions are seen per tick.",
        ),
        nvml_retry: float = typer.Option(5.0, help="Retry NVML init this often while down (s)."),
        nvml_library: str = typer.Option(
            None, help="Load this file as libnvidia-ml.so.1 instead of the system's."
        ),
        grpc_listen: str = typer.Option("0.0.0.0:50051", help="TelemetryService address."),
        metrics_listen: str = typer.Option("0.0.0.0:9400", help="Prometheus /metrics address."),
        advertise: str = typer.Option(
            None, help="HOST:PORT for the node's copack.io/agent annotation "
            "(default: $POD_IP or the hostname, with the gRPC port)."
        ),
        kubeconfig: str = typer.Option(
            None, help="Kubeconfig for the inventory patch (default: in-cluster, else none)."
        ),
        inventory: bool = typer.Option(
            True, "--inventory/--no-inventory", help="Patch the node's inventory annotations."
        ),
        pod_resources_socket: str = typer.Option(
            DEFAULT_SOCKET, help="Kubelet pod-resources socket; '' turns pod attribution off."
        ),
        pod_refresh: float = typer.Option(10.0, help="Pod-resources poll interval (seconds)."),
        watch_queue: int = typer.Option(8, help="Snapshots queued per Watch subscriber."),
        max_watchers: int = typer.Option(32, help="Concurrent Watch streams allowed."),
        device_plugin: bool = typer.Option(
            False, "--device-plugin/--no-device-plugin",
            help="Serve the copack.io/gpu device plugin to the kubelet (needs the Kubernetes API).",
        ),
        slots_per_unit: int = typer.Option(4, help="copack.io/gpu slots advertised per unit."),
        device_plugin_dir: str = typer.Option(
            "/var/lib/kubelet/device-plugins", help="Kubelet device-plugin socket directory."
        ),
        mps: bool = typer.Option(
            False, "--mps/--no-mps", help="Run one supervised MPS control daemon per unit."
        ),
        mps_root: str = typer.Option("/run/copack/mps", help="Per-unit MPS pipe/log directories."),
        mps_control: str = typer.Option(
            "nvidia-cuda-mps-control", help="The MPS control binary."
        ),
        cdi: bool = typer.Option(
            False, "--cdi/--no-cdi", help="Hand out CDI device names instead of the env var."
        ),
        cdi_kind: str = typer.Option("nvidia.com/gpu", help="CDI kind of the device names."),
        log_level: str = typer.Option("info", help="debug, info, warning or error."),
    ) -> None:
        """Run the node agent until SIGTERM/SIGINT."""
        from kubernetes.config.config_exception import ConfigException

        from node_agent.agent import Agent, AgentConfig, default_node_name
        from node_agent.device_plugin.config import DevicePluginConfig
        from node_agent.sampler import SamplerConfig

        level = getattr(logging, log_level.upper(), None)
        if not isinstance(level, int):
            raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            cfg = AgentConfig(
                sampler=SamplerConfig(
                    node=node or default_node_name(),
                    interval_s=interval,
                    ewma_halflife_s=ewma_halflife,
                    window_s=window,
                    rescan_interval_s=rescan_interval,
                    nvml_retry_s=nvml_retry,
                    nvml_library=nvml_library,
                ),
                grpc_listen=grpc_listen,
                metrics_listen=metrics_listen,
                advertise=advertise,
                kubeconfig=kubeconfig,
                publish_inventory=inventory,
                pod_resources_socket=pod_resources_socket or None,
                pod_refresh_s=pod_refresh,
                watch_queue_depth=watch_queue,
                max_watchers=max_watchers,
            )
            agent = Agent(cfg)
            plugin = (
                _device_plugin(
                    agent, kubeconfig,
                    DevicePluginConfig(
                        node_name=cfg.sampler.node, slots_per_unit=slots_per_unit,
                        socket_dir=device_plugin_dir,
                        pod_resources_socket=pod_resources_socket or None,
                        mps=mps, mps_root=mps_root, mps_control_binary=mps_control,
                        cdi=cdi, cdi_kind=cdi_kind,
                    ),
                )
                if device_plugin
                else None
            )
        except (ValueError, OSError, ConfigException) as e:
            typer.echo(f"copack agent: {e}", err=True)
            raise typer.Exit(2) from None
        done = threading.Event()

        def _stop(signum: int, frame: object) -> None:
            done.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        agent.start()
        try:
            if plugin is not None:
                try:
                    plugin.start()
                except OSError as e:
                    typer.echo(f"copack agent: device plugin: {e}", err=True)
                    raise typer.Exit(2) from None
            done.wait()
        finally:
            if plugin is not None:
                plugin.stop()
            agent.stop()

    app.add_typer(agent_app, name="agent")


def _device_plugin(agent, kubeconfig: str | None, config):
    """Build the device plugin beside the agent, sharing its sampler and its /metrics."""
    from node_agent.device_plugin.metrics import DevicePluginCollector
    from node_agent.device_plugin.service import DevicePluginService
    from node_agent.inventory_publisher import load_api_client

    api = load_api_client(kubeconfig)
    if api is None:
        raise ValueError("--device-plugin needs the Kubernetes API (in-cluster or --kubeconfig)")
    service = DevicePluginService(config, agent.sampler, api)
    agent.metrics.registry.register(DevicePluginCollector())
    return service
