"""The `copack` command: each component registers its own subcommands here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="copack",
    help="Co-pack vLLM prefill and decode pods onto GPUs and MIG slices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_components() -> None:
    from extender import cli as extender_cli
    from node_agent import cli as agent_cli
    from rebalancer import cli as rebalancer_cli
    from sim import cli as sim_cli
    from workloads import cli as workloads_cli

    for component in (sim_cli, extender_cli, agent_cli, workloads_cli, rebalancer_cli):
        component.register(app)


_register_components()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
