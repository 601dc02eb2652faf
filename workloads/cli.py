"""`copack workload serve|proxy|render|replay`: the commands contributed by `workloads`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from workloads.discovery import HANDOVER_DRAIN_S
from workloads.idle_wait import DEFAULT_IDLE_S

workload_app = typer.Typer(
    name="workload",
    help="vLLM prefill/decode servers: launcher, P/D proxy, manifests, load generator.",
    no_args_is_help=True,
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@workload_app.command(
    "serve",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def serve(
    ctx: typer.Context,
    role: Annotated[str, typer.Option(help="prefill, decode or mixed")],
    model: Annotated[str, typer.Option(help="model id or local path, as vLLM takes it")],
    connector: Annotated[
        str | None,
        typer.Option(help="KV connector: nixl, example or none (default: nixl; none for mixed)"),
    ] = None,
    host: Annotated[str, typer.Option()] = "0.0.0.0",
    port: Annotated[int, typer.Option()] = 8000,
    device: Annotated[str, typer.Option(help="auto, gpu or cpu")] = "auto",
    served_model_name: Annotated[str | None, typer.Option()] = None,
    max_model_len: Annotated[int | None, typer.Option()] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="override the share derived from the pod's placement")
    ] = None,
    enforce_eager: Annotated[bool, typer.Option(help="no CUDA graphs / compile")] = False,
    side_channel_port: Annotated[int, typer.Option(help="NIXL side-channel port")] = 5600,
    shared_storage_path: Annotated[
        str, typer.Option(help="KV directory of the example connector")
    ] = "/tmp/copack-kv",
    cpu_cores: Annotated[
        str | None, typer.Option(help="CPU device: cores for vLLM's threads, e.g. 0-3")
    ] = None,
    python: Annotated[str, typer.Option(help="interpreter that has vLLM")] = sys.executable,
    dry_run: Annotated[bool, typer.Option(help="print the command and exit")] = False,
) -> None:
    """Start the vLLM server for a role (extra vLLM flags may follow `--`)."""
    from workloads.launcher import LaunchError, ServeSpec, build_plan, exec_plan, split_extra

    spec = ServeSpec(
        role=role.strip().lower(),
        model=model,
        connector=connector,
        host=host,
        port=port,
        device=device,
        served_model_name=served_model_name,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        side_channel_port=side_channel_port,
        shared_storage_path=shared_storage_path,
        cpu_cores=cpu_cores,
        python=python,
        extra_args=split_extra(ctx.args),
    )
    try:
        plan = build_plan(spec)
    except LaunchError as e:
        _fail(str(e))
        return
    if dry_run:
        typer.echo(plan.render())
        return
    for note in plan.notes:
        typer.echo(f"copack: {note}", err=True)
    try:
        exec_plan(plan)
    except OSError as e:
        _fail(f"cannot start {plan.argv[0]}: {e.strerror or e}")


@workload_app.command("proxy")
def proxy(
    prefill: Annotated[
        list[str] | None, typer.Option("--prefill", help="prefill server URL (repeatable)")
    ] = None,
    decode: Annotated[
        list[str] | None, typer.Option("--decode", help="decode server URL (repeatable)")
    ] = None,
    prefill_selector: Annotated[
        str | None, typer.Option(help="label selector of prefill pods (Kubernetes)")
    ] = None,
    decode_selector: Annotated[
        str | None, typer.Option(help="label selector of decode pods (Kubernetes)")
    ] = None,
    namespace: Annotated[str, typer.Option()] = "default",
    backend_port: Annotated[int, typer.Option(help="port of the discovered pods")] = 8000,
    kubeconfig: Annotated[str | None, typer.Option()] = None,
    discovery_interval: Annotated[float, typer.Option(help="seconds between pod lists")] = 5.0,
    handover: Annotated[
        bool,
        typer.Option(help="keep routing to a prefill pod being deleted while its replacement "
                     "starts (make-before-break)"),
    ] = True,
    handover_drain: Annotated[
        float,
        typer.Option(help="seconds before a handed-over pod's deletion deadline at which "
                     "routing to it stops"),
    ] = HANDOVER_DRAIN_S,
    host: Annotated[str, typer.Option()] = "0.0.0.0",
    port: Annotated[int, typer.Option()] = 8000,
    connect_timeout: Annotated[float, typer.Option(help="seconds")] = 5.0,
    prefill_timeout: Annotated[float, typer.Option(help="seconds for a prefill answer")] = 300.0,
    decode_timeout: Annotated[
        float, typer.Option(help="seconds to decode's first byte and between chunks")
    ] = 300.0,
) -> None:
    """The P/D proxy: OpenAI API in front of prefill and decode servers."""
    import gc
    import logging

    import uvicorn

    from workloads.balancer import normalize_url
    from workloads.proxy import PDProxy, ProxyConfig

    if prefill and prefill_selector:
        _fail("give --prefill URLs or --prefill-selector, not both")
    if decode and decode_selector:
        _fail("give --decode URLs or --decode-selector, not both")
    if not decode and not decode_selector:
        _fail("no decode backends: give --decode URL(s) or --decode-selector")
    try:
        for url in [*(prefill or []), *(decode or [])]:
            normalize_url(url)
    except ValueError as e:
        _fail(str(e))
    for name, value in (
        ("--connect-timeout", connect_timeout),
        ("--prefill-timeout", prefill_timeout),
        ("--decode-timeout", decode_timeout),
        ("--discovery-interval", discovery_interval),
    ):
        if value <= 0:
            _fail(f"{name} must be positive")
    if handover_drain < 0:
        _fail("--handover-drain must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = ProxyConfig(
        prefill=list(prefill or []),
        decode=list(decode or []),
        connect_timeout_s=connect_timeout,
        prefill_timeout_s=prefill_timeout,
        decode_timeout_s=decode_timeout,
    )
    pd = PDProxy(cfg)
    if prefill_selector or decode_selector:
        from workloads.discovery import KubeDiscovery, KubeSelector, load_api_client

        try:
            api = load_api_client(kubeconfig)
        except Exception as e:
            _fail(f"cannot load a Kubernetes configuration: {e}")
            return
        selectors = []
        if prefill_selector:
            selectors.append(KubeSelector(
                pd.prefill, namespace, prefill_selector, backend_port,
                handover_drain if handover else None,
            ))
        if decode_selector:
            selectors.append(KubeSelector(pd.decode, namespace, decode_selector, backend_port))
        pd.add_background(KubeDiscovery(api, selectors, discovery_interval).loop)
    # Everything loaded so far lives as long as the process: keep it out of the collector's
    # full passes (~60 ms each on the 2-core CI box, a tail-latency spike per pass).
    gc.collect()
    gc.freeze()
    uvicorn.run(pd.app, host=host, port=port, log_level="warning")


@workload_app.command("wait-idle")
def wait_idle_cmd(
    port: Annotated[int, typer.Option(help="the vLLM server's port on this pod")] = 8000,
    idle: Annotated[
        float, typer.Option(help="seconds without a request to wait for")
    ] = DEFAULT_IDLE_S,
    poll: Annotated[float, typer.Option(help="seconds between /metrics reads")] = 1.0,
) -> None:
    """preStop hook: keep the pod up until its vLLM server has been idle (docs/workloads.md)."""
    from workloads.idle_wait import wait_idle

    if idle < 0 or poll <= 0:
        _fail("--idle must be >= 0 and --poll positive")
    why = wait_idle(f"http://127.0.0.1:{port}/metrics", idle, poll)
    typer.echo(f"wait-idle: {why}", err=True)


@workload_app.command("render")
def render(
    model: Annotated[str, typer.Option(help="model id served by every pod")],
    prefill: Annotated[int, typer.Option(help="prefill replicas (0: mixed servers only)")] = 1,
    decode: Annotated[int, typer.Option(help="decode replicas")] = 1,
    name: Annotated[str | None, typer.Option(help="name prefix (default: from model)")] = None,
    namespace: Annotated[str, typer.Option()] = "default",
    image: Annotated[str | None, typer.Option(help="vLLM + copack image")] = None,
    proxy_image: Annotated[str | None, typer.Option(help="proxy image")] = None,
    connector: Annotated[str, typer.Option(help="nixl or example")] = "nixl",
    load: Annotated[str | None, typer.Option(help="copack.io/load, e.g. rps=4,prompt=2048")] = None,
    slo: Annotated[str | None, typer.Option(help="copack.io/slo, e.g. ttft=500ms")] = None,
    prefill_demand: Annotated[str | None, typer.Option(help="copack.io/demand of prefill")] = None,
    decode_demand: Annotated[str | None, typer.Option(help="copack.io/demand of decode")] = None,
    max_model_len: Annotated[int | None, typer.Option()] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="yaml or json")] = "yaml",
) -> None:
    """Print the Deployments, proxy and Service of a P/D deployment."""
    from workloads.manifests import (
        DEFAULT_PROXY_IMAGE,
        DEFAULT_VLLM_IMAGE,
        RenderError,
        RenderSpec,
        to_yaml,
    )
    from workloads.manifests import render as render_objects

    if output not in ("yaml", "json"):
        _fail(f"--output {output!r} is not yaml or json")
    spec = RenderSpec(
        model=model,
        prefill=prefill,
        decode=decode,
        name=name,
        namespace=namespace,
        image=image or DEFAULT_VLLM_IMAGE,
        proxy_image=proxy_image or DEFAULT_PROXY_IMAGE,
        connector=connector,
        load=load,
        slo=slo,
        prefill_demand=prefill_demand,
        decode_demand=decode_demand,
        max_model_len=max_model_len,
    )
    try:
        objects = render_objects(spec)
    except RenderError as e:
        _fail(str(e))
        return
    if output == "json":
        typer.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    else:
        typer.echo(to_yaml(objects), nl=False)


@workload_app.command("replay")
def replay(
    trace: Annotated[
        str,
        typer.Option(
            help="trace file (Azure-style CSV or JSON lines) or a bundled trace: code, conv"
        ),
    ],
    url: Annotated[str, typer.Option(help="OpenAI endpoint base, e.g. http://127.0.0.1:8000")],
    limit: Annotated[int | None, typer.Option(help="replay only the first N requests")] = None,
    speedup: Annotated[float, typer.Option(help="time compression (10 = 10x faster)")] = 1.0,
    prompt_scale: Annotated[float, typer.Option(help="multiply prompt lengths")] = 1.0,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="cap prompt lengths")] = None,
    max_output_tokens: Annotated[int | None, typer.Option(help="cap output lengths")] = None,
    model: Annotated[str | None, typer.Option(help="model name (default: /v1/models)")] = None,
    chat: Annotated[bool, typer.Option(help="use /v1/chat/completions")] = False,
    ignore_eos: Annotated[bool, typer.Option(help="generate the trace's output length")] = True,
    calibrate: Annotated[bool, typer.Option(help="size prompts by the server's /tokenize")] = True,
    max_concurrency: Annotated[int | None, typer.Option(help="cap requests in flight")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 600.0,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[Path | None, typer.Option(help="write the report as JSON")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Replay a trace against an endpoint; report TTFT/TPOT percentiles and throughput."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from workloads.data import trace_file
    from workloads.loadgen import ReplayConfig, ReplayError, format_report
    from workloads.loadgen import replay as run_replay
    from workloads.trace import TraceError, load_trace_file, shape_trace

    if max_concurrency is not None and max_concurrency < 1:
        _fail("--max-concurrency must be at least 1")
    if timeout <= 0:
        _fail("--timeout must be positive")
    try:
        requests = shape_trace(
            load_trace_file(trace_file(trace), limit),
            speedup=speedup,
            prompt_scale=prompt_scale,
            max_prompt_tokens=max_prompt_tokens,
            max_output_tokens=max_output_tokens,
        )
    except TraceError as e:
        _fail(str(e))
        return
    cfg = ReplayConfig(
        url=url,
        model=model,
        endpoint="/v1/chat/completions" if chat else "/v1/completions",
        timeout_s=timeout,
        ignore_eos=ignore_eos,
        calibrate=calibrate,
        max_concurrency=max_concurrency,
        seed=seed,
    )
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )
    with bar:
        task = bar.add_task("replay", total=len(requests), errors=0)
        errors = 0

        def done(result: object) -> None:
            nonlocal errors
            errors += 0 if getattr(result, "ok", False) else 1
            bar.update(task, advance=1, errors=errors)

        try:
            report, _ = run_replay(requests, cfg, on_done=done)
        except ReplayError as e:
            bar.stop()
            _fail(str(e))
            return
    typer.echo(format_report(report))
    if json_out is not None:
        json_out.write_text(json.dumps(report.as_dict(), indent=2))
    if report.ok == 0:
        raise typer.Exit(code=1)


def calibrate(
    data: Annotated[
        Path | None,
        typer.Option(help="MuxServe SM-share table (JSON; default: the bundled one)"),
    ] = None,
    models: Annotated[str, typer.Option(help="comma-separated table models")] = (
        "llama-7b,llama-13b"
    ),
    from_scratch: Annotated[
        bool, typer.Option(help="start from neutral constants instead of the shipped calibration")
    ] = False,
) -> None:
    """Fit the roofline model's efficiency factors and overhead to the MuxServe table and
    print them next to the shipped constants (workloads/roofline.py CALIBRATION)."""
    from workloads.calibration import fit, load_muxserve, muxserve_points, summary
    from workloads.data import MUXSERVE_PROFILE, data_file
    from workloads.roofline import CALIBRATION, Calibration

    try:
        table = load_muxserve(data or data_file(MUXSERVE_PROFILE))
        pts = muxserve_points(table, tuple(m.strip() for m in models.split(",") if m.strip()))
    except (FileNotFoundError, KeyError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    start = Calibration(0.5, 0.5, 1e-4, 0.5, 2.0) if from_scratch else CALIBRATION
    fitted = summary(fit(pts, start=start), pts)
    shipped = summary(CALIBRATION, pts)
    typer.echo(f"{'':24}{'fitted':>14}{'shipped':>14}")
    for k, v in fitted.items():
        typer.echo(f"{k:24}{v:>14.6g}{shipped[k]:>14.6g}")


def register(app: typer.Typer) -> None:
    """Add this component's commands to the top-level app."""
    app.add_typer(workload_app, name="workload")
    app.command("calibrate")(calibrate)
