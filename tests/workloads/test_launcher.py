"""The vLLM command line `copack workload serve` builds for each role and placement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from copack.cli import app
from workloads.launcher import (
    LaunchError,
    ServeSpec,
    build_plan,
    memory_utilization,
)
from workloads.roles import role_from_command

GPU_ENV = {"NVIDIA_VISIBLE_DEVICES": "GPU-1234", "POD_IP": "10.0.0.7"}


def kv_config(argv: list[str]) -> dict | None:
    if "--kv-transfer-config" not in argv:
        return None
    return json.loads(argv[argv.index("--kv-transfer-config") + 1])


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize(
    ("role", "kv_role"), [("prefill", "kv_producer"), ("decode", "kv_consumer")]
)
def test_nixl_roles_on_gpu(role: str, kv_role: str) -> None:
    plan = build_plan(ServeSpec(role=role, model="m", device="gpu"), GPU_ENV)
    assert plan.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert kv_config(plan.argv) == {
        "kv_connector": "NixlConnector",
        "kv_role": kv_role,
        "kv_buffer_device": "cuda",
    }
    assert plan.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.7"
    assert plan.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    assert "UCX_TLS" not in plan.env
    # The scheduler reads the role back from the command line it would run.
    assert role_from_command(plan.argv) == role


def test_nixl_on_cpu_uses_cpu_buffers_and_tcp() -> None:
    plan = build_plan(ServeSpec(role="prefill", model="m", device="cpu"), {})
    assert kv_config(plan.argv)["kv_buffer_device"] == "cpu"
    assert plan.env["UCX_TLS"] == "tcp,self,sm"
    assert "--gpu-memory-utilization" not in plan.argv


def test_example_connector_keeps_kv_in_the_shared_path() -> None:
    spec = ServeSpec(role="decode", model="m", connector="example", shared_storage_path="/kv")
    cfg = kv_config(build_plan(spec, {}).argv)
    assert cfg == {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_consumer",
        "kv_connector_extra_config": {"shared_storage_path": "/kv"},
    }


def test_mixed_has_no_connector_unless_asked() -> None:
    assert kv_config(build_plan(ServeSpec(role="mixed", model="m"), {}).argv) is None
    plan = build_plan(ServeSpec(role="mixed", model="m", connector="nixl"), {})
    assert kv_config(plan.argv)["kv_role"] == "kv_both"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"COPACK_SM_SHARE": "100"}, None),
        ({"COPACK_SM_SHARE": "30"}, 0.45),
        ({"COPACK_DEMAND": "mem=20Gi"}, 0.25),
        ({"COPACK_DEMAND": "sm=0.3,mem=40Gi", "COPACK_SM_SHARE": "30"}, 0.5),
        ({"COPACK_DEMAND": "mem=1Gi"}, 0.05),  # floor
        ({"COPACK_DEMAND": "mem=79Gi"}, 0.92),  # ceiling: room for a neighbour's context
        ({"COPACK_DEMAND": "sm=0.5", "COPACK_SM_SHARE": "50"}, 0.45),  # no mem: even split
    ],
)
def test_memory_share_from_placement(env: dict[str, str], expected: float | None) -> None:
    util, why = memory_utilization(env, unit_memory_bytes=80 * 1024**3)
    assert util == expected, why


def test_memory_flag_reaches_the_command_line() -> None:
    env = {**GPU_ENV, "COPACK_DEMAND": "mem=20Gi", "COPACK_UNIT_MEMORY_BYTES": str(80 * 1024**3)}
    plan = build_plan(ServeSpec(role="decode", model="m"), env)
    assert flag(plan.argv, "--gpu-memory-utilization") == "0.25"
    explicit = build_plan(ServeSpec(role="decode", model="m", gpu_memory_utilization=0.6), env)
    assert flag(explicit.argv, "--gpu-memory-utilization") == "0.6"


def test_demand_without_known_unit_memory_leaves_vllm_default() -> None:
    util, why = memory_utilization({"COPACK_DEMAND": "mem=20Gi"}, unit_memory_bytes=None)
    assert util is None and "unknown" in why


@pytest.mark.parametrize(
    ("spec", "env", "fragment"),
    [
        (ServeSpec(role="router", model="m"), {}, "role 'router'"),
        (ServeSpec(role="prefill", model="m", connector="p2p"), {}, "connector 'p2p'"),
        (ServeSpec(role="decode", model="m", connector="none"), {}, "needs a KV connector"),
        (ServeSpec(role="decode", model=" "), {}, "--model is empty"),
        (ServeSpec(role="decode", model="m", port=70000), {}, "port 70000"),
        (ServeSpec(role="decode", model="m", device="tpu"), {}, "device 'tpu'"),
        (
            ServeSpec(role="decode", model="m", extra_args=["--kv-transfer-config", "{}"]),
            {},
            "set by the launcher",
        ),
        (ServeSpec(role="decode", model="m"), {**GPU_ENV, "COPACK_SM_SHARE": "abc"}, "percentage"),
        (ServeSpec(role="decode", model="m"), {**GPU_ENV, "COPACK_SM_SHARE": "0"}, "between 1"),
        (ServeSpec(role="decode", model="m"), {**GPU_ENV, "COPACK_DEMAND": "mem=lots"}, "mem"),
        (
            ServeSpec(role="decode", model="m"),
            {**GPU_ENV, "COPACK_DEMAND": "mem=90Gi", "COPACK_UNIT_MEMORY_BYTES": "1000"},
            "exceeds",
        ),
        (
            ServeSpec(role="decode", model="m"),
            {**GPU_ENV, "COPACK_DEMAND": "mem=1Gi", "COPACK_UNIT_MEMORY_BYTES": "x"},
            "byte count",
        ),
    ],
)
def test_bad_requests_are_refused_clearly(spec: ServeSpec, env: dict, fragment: str) -> None:
    with pytest.raises(LaunchError, match=fragment):
        build_plan(spec, env)


def test_device_detection() -> None:
    assert "cuda" in build_plan(ServeSpec(role="prefill", model="m"), GPU_ENV).argv[-1]
    void = {"NVIDIA_VISIBLE_DEVICES": "void"}
    assert '"cpu"' in build_plan(ServeSpec(role="prefill", model="m"), void).argv[-1]


runner = CliRunner()


def test_cli_dry_run_prints_the_command_and_env() -> None:
    result = runner.invoke(
        app,
        ["workload", "serve", "--role", "decode", "--model", "org/m", "--device", "gpu",
         "--port", "9000", "--dry-run", "--", "--dtype", "half"],
        env={"POD_IP": "10.1.1.1", "COPACK_SM_SHARE": "40"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.output
    assert "VLLM_NIXL_SIDE_CHANNEL_HOST=10.1.1.1" in out
    assert "-m vllm.entrypoints.openai.api_server --model org/m" in out
    assert "--port 9000" in out and "--gpu-memory-utilization 0.45" in out
    assert out.rstrip().endswith("--dtype half")


def test_cli_error_is_one_line_not_a_traceback() -> None:
    result = runner.invoke(app, ["workload", "serve", "--role", "boss", "--model", "m"])
    assert result.exit_code == 2
    assert "error: role 'boss'" in result.output
    assert "Traceback" not in result.output


def test_unit_memory_comes_from_nvml_by_uuid_also_for_a_mig_slice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real pynvml against the fake libnvidia-ml: a 3g.40gb slice sizes by its own memory."""
    import pynvml

    from tests.fakes import nvml as fake

    # install() points this process's pynvml at the fake: undo that after the test.
    monkeypatch.setattr(pynvml, "nvmlLib", pynvml.nvmlLib)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    monkeypatch.setenv(fake.SCENARIO_ENV, "")

    layout = fake.mig_layout("H100", 1, ["3g.40gb", "3g.40gb"])
    scen = fake.scenario([fake.gpu("H100", 0), fake.gpu("H100", 1, mig=layout)])
    nv = fake.FakeNvml(tmp_path, scen)
    nv.install()
    whole, mig = scen["gpus"][0], layout[0]
    env = {"COPACK_DEMAND": "mem=10Gi", "NVIDIA_VISIBLE_DEVICES": mig["uuid"], "POD_IP": "1.2.3.4"}
    plan = build_plan(ServeSpec(role="decode", model="m", device="gpu"), env)
    expected = round(10 * 1024**3 / mig["memory_total"], 3)
    assert flag(plan.argv, "--gpu-memory-utilization") == f"{expected:g}"
    assert mig["memory_total"] < whole["memory_total"] / 2
    # copack's own annotation wins over what the runtime put in NVIDIA_VISIBLE_DEVICES.
    env2 = {"COPACK_DEMAND": "mem=10Gi", "COPACK_UNIT": whole["uuid"], **GPU_ENV}
    plan2 = build_plan(ServeSpec(role="decode", model="m", device="gpu"), env2)
    expected2 = round(10 * 1024**3 / whole["memory_total"], 3)
    assert flag(plan2.argv, "--gpu-memory-utilization") == f"{expected2:g}"
    # An unknown UUID (or no driver) leaves vLLM's default and says why.
    env3 = {"COPACK_DEMAND": "mem=10Gi", "COPACK_UNIT": "GPU-nope", **GPU_ENV}
    plan3 = build_plan(ServeSpec(role="decode", model="m", device="gpu"), env3)
    assert "--gpu-memory-utilization" not in plan3.argv
    assert any("unknown" in n for n in plan3.notes)


def test_cli_missing_interpreter_is_a_clear_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-python")
    result = runner.invoke(
        app, ["workload", "serve", "--role", "mixed", "--model", "m", "--python", missing]
    )
    assert result.exit_code == 2
    assert f"cannot start {missing}" in result.output and "Traceback" not in result.output


def test_cpu_cores_bind_vllm_threads() -> None:
    plan = build_plan(ServeSpec(role="prefill", model="m", device="cpu", cpu_cores="0-3,8"), {})
    assert plan.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3,8"
    with pytest.raises(LaunchError, match="core list"):
        build_plan(ServeSpec(role="prefill", model="m", device="cpu", cpu_cores="all"), {})
    with pytest.raises(LaunchError, match="CPU device only"):
        build_plan(ServeSpec(role="prefill", model="m", device="gpu", cpu_cores="0"), GPU_ENV)
