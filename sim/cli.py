"""Subcommands of `copack` contributed by `sim`: `copack demo` and `copack sim`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from sim.scenario import (
    DEFAULT_SCENARIO,
    POLICIES,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
    with_trace,
)


def _run(scenario: Scenario, out: Path, policies: list[str] | None, workers: int) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from sim.report import rich_gap_table, rich_table
    from sim.simulate import run_scenario, write_report

    console = Console(width=max(Console().width, 170))
    pols = policies or list(scenario.policies)
    unknown = [p for p in pols if p not in POLICIES]
    if unknown:
        raise typer.BadParameter(
            f"unknown policy {', '.join(unknown)} (known: {', '.join(POLICIES)})",
            param_hint="--policy",
        )
    gpus = sum(p.count * p.gpus_per_node for p in scenario.cluster.pools)
    console.print(
        f"[bold]copack sim[/bold] {scenario.name}: {gpus} GPUs, {len(scenario.services)} services, "
        f"{scenario.duration_s / 60:.0f} simulated minutes, policies {', '.join(pols)}"
    )
    t0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks = {p: bar.add_task(p, total=1.0) for p in pols}

        def progress(policy: str, frac: float) -> None:
            bar.update(tasks[policy], completed=frac)

        try:
            results = run_scenario(scenario, policies=pols, progress=progress, workers=workers)
        except Exception as e:  # a run that cannot finish: say why, not a traceback
            if os.environ.get("COPACK_DEBUG"):
                raise
            console.print(f"[red]simulation failed[/red]: {type(e).__name__}: {e}")
            console.print("(set COPACK_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None
    try:
        path = write_report(results, out, scenario)
    except OSError as e:
        console.print(f"[red]cannot write the report under {out}[/red]: {e.strerror or e}")
        raise typer.Exit(1) from None
    console.print(rich_table(results, f"{scenario.name} ({time.perf_counter() - t0:.0f} s)"))
    console.print(rich_gap_table(results))
    console.print(f"report: {path}")


def _prepare(
    config: Path | None, trace: Path | None, duration_s: float | None
) -> Scenario:
    """The scenario to run: a file or the embedded default, with the user's trace and duration
    applied; a bad file or trace exits 2 before anything runs or is written."""
    try:
        scenario = load_scenario(config or DEFAULT_SCENARIO)
        if trace is not None:
            scenario = with_trace(scenario, trace)
        if duration_s is not None:
            raw = scenario.model_dump(mode="python")
            raw["duration_s"] = duration_s
            scenario = parse_scenario(raw, f"{scenario.name} with --duration-s {duration_s:g}")
    except ScenarioError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    return scenario


_OUT = typer.Option(Path("out"), help="folder for the HTML report")
_POLICY = typer.Option(None, help="run only these policies (repeatable)")
_WORKERS = typer.Option(0, help="parallel processes (0: up to 2, one per core)")
_DURATION = typer.Option(None, "--duration-s", help="simulate this many seconds instead")


def register(app: typer.Typer) -> None:
    """Add this component's commands to the top-level app."""

    @app.command("demo")
    def demo(
        out: Path = _OUT,
        policy: list[str] = _POLICY,
        workers: int = _WORKERS,
        duration_s: float | None = _DURATION,
    ) -> None:
        """Simulate the embedded default scenario under every policy and print the table."""
        from sim.simulate import default_workers

        scenario = _prepare(None, None, duration_s)
        _run(scenario, out, policy or None, workers or default_workers())

    @app.command("sim")
    def sim(
        config: Path | None = typer.Option(
            None, "--config", "-c", help="scenario YAML file (default: the embedded default)"
        ),
        trace: Path | None = typer.Option(
            None,
            "--trace",
            help="replay this trace in every service: a CSV with TIMESTAMP,ContextTokens,"
            "GeneratedTokens or JSON lines with timestamp (ms), input_length, output_length",
        ),
        out: Path = _OUT,
        policy: list[str] = _POLICY,
        workers: int = _WORKERS,
        duration_s: float | None = _DURATION,
    ) -> None:
        """Simulate a scenario file, or the default scenario on your own trace."""
        from sim.simulate import default_workers

        if config is None and trace is None:
            typer.echo("copack sim: give --config FILE, --trace FILE, or both", err=True)
            raise typer.Exit(2)
        scenario = _prepare(config, trace, duration_s)
        _run(scenario, out, policy or None, workers or default_workers())
