"""Subcommands of `copack` contributed by `policies` (decision core and demand model)."""

from __future__ import annotations

from pathlib import Path

import typer

DEFAULT_MUXSERVE = Path("..") / "shared" / "data" / "muxserve_llama_a100_profile.json"


def register(app: typer.Typer) -> None:
    """Add this component's commands to the top-level app."""

    @app.command("calibrate")
    def calibrate(
        data: Path = typer.Option(DEFAULT_MUXSERVE, help="MuxServe SM-share table (JSON)"),
        models: str = typer.Option("llama-7b,llama-13b", help="comma-separated table models"),
        from_scratch: bool = typer.Option(
            False, help="start from neutral constants instead of the shipped calibration"
        ),
    ) -> None:
        """Fit the roofline model's efficiency factors and overhead to the MuxServe table and
        print them next to the shipped constants (workloads/roofline.py CALIBRATION)."""
        from workloads.calibration import fit, load_muxserve, muxserve_points, summary
        from workloads.roofline import CALIBRATION, Calibration

        try:
            table = load_muxserve(data)
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
