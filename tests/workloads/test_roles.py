"""Role inference over pods as the API serves them (camelCase JSON dicts)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workloads.roles import (
    AIBRIX_ROLE_LABEL,
    DYNAMO_ROLE_LABEL,
    LLMD_ROLE_LABEL,
    infer_role,
    role_from_command,
)


def pod(*containers: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "default", "labels": labels or {}},
        "spec": {"containers": list(containers) or [{"name": "c", "image": "i"}]},
    }


def vllm(kv_role: str, *, form: str = "separate") -> dict[str, Any]:
    cfg = json.dumps({"kv_connector": "NixlConnector", "kv_role": kv_role})
    base = ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"]
    if form == "separate":
        return {"name": "vllm", "command": base, "args": ["--kv-transfer-config", cfg]}
    if form == "equals":
        return {"name": "vllm", "command": [*base, f"--kv-transfer-config={cfg}"]}
    if form == "shell":
        script = " ".join(base) + f" --port 8000 --kv-transfer-config '{cfg}'"
        return {"name": "vllm", "command": ["/bin/sh", "-c"], "args": [script]}
    if form == "dotted":
        args = ["vllm", "serve", "m", "--kv-transfer-config.kv_role", kv_role]
        return {"name": "vllm", "args": args}
    raise AssertionError(form)


@pytest.mark.parametrize("form", ["separate", "equals", "shell", "dotted"])
@pytest.mark.parametrize(
    ("kv_role", "role"),
    [("kv_producer", "prefill"), ("kv_consumer", "decode"), ("kv_both", "mixed")],
)
def test_kv_role_in_every_command_line_form(form: str, kv_role: str, role: str) -> None:
    assert infer_role(pod(vllm(kv_role, form=form))) == role


@pytest.mark.parametrize(
    ("argv", "role"),
    [
        (["copack", "workload", "serve", "--role", "prefill", "--model", "m"], "prefill"),
        (["copack", "workload", "serve", "--role=decode"], "decode"),
        (["copack", "workload", "serve", "--role", "mixed"], "mixed"),
        (["python3", "-m", "dynamo.vllm", "--model", "m", "--is-prefill-worker"], "prefill"),
        (["python3", "-m", "dynamo.vllm", "--is-decode-worker"], "decode"),
        (["python3", "-m", "sglang.launch_server", "--disaggregation-mode", "decode"], "decode"),
        (["python3", "-m", "sglang.launch_server", "--disaggregation-mode=prefill"], "prefill"),
    ],
)
def test_other_launchers(argv: list[str], role: str) -> None:
    assert role_from_command(argv) == role


def test_role_flag_of_an_unrelated_program_is_not_read() -> None:
    # `--role` means nothing in general: only our launcher's is a serving role.
    assert role_from_command(["some-tool", "--role", "decode"]) is None


@pytest.mark.parametrize(
    ("label", "value", "role"),
    [
        (LLMD_ROLE_LABEL, "prefill", "prefill"),
        (LLMD_ROLE_LABEL, "decode", "decode"),
        (LLMD_ROLE_LABEL, "both", "mixed"),
        (DYNAMO_ROLE_LABEL, "prefill", "prefill"),
        (DYNAMO_ROLE_LABEL, "decode", "decode"),
        (AIBRIX_ROLE_LABEL, "prefill", "prefill"),
        (AIBRIX_ROLE_LABEL, "decode", "decode"),
    ],
)
def test_role_labels(label: str, value: str, role: str) -> None:
    assert infer_role(pod(labels={label: value})) == role


def test_aibrix_role_that_is_not_a_serving_role_says_nothing() -> None:
    assert infer_role(pod(labels={AIBRIX_ROLE_LABEL: "routing"})) is None


def test_command_line_wins_over_labels() -> None:
    assert infer_role(pod(vllm("kv_consumer"), labels={LLMD_ROLE_LABEL: "prefill"})) == "decode"


def test_containers_with_different_roles_make_a_mixed_pod() -> None:
    assert infer_role(pod(vllm("kv_producer"), vllm("kv_consumer"))) == "mixed"


def test_sidecar_without_role_does_not_dilute_the_engine_role() -> None:
    sidecar = {"name": "routing-proxy", "image": "x", "args": ["--port", "8000"]}
    assert infer_role(pod(sidecar, vllm("kv_producer"))) == "prefill"


def test_last_kv_transfer_config_wins_like_argparse() -> None:
    c = vllm("kv_producer")
    c["args"] += ["--kv-transfer-config", json.dumps({"kv_role": "kv_consumer"})]
    assert infer_role(pod(c)) == "decode"


@pytest.mark.parametrize(
    "container",
    [
        {"name": "c", "args": ["--kv-transfer-config", "{not json"]},
        {"name": "c", "args": ["--kv-transfer-config", "[1, 2]"]},
        {"name": "c", "args": ["--kv-transfer-config", '{"kv_role": "kv_sideways"}']},
        {"name": "c", "args": ["--kv-transfer-config", '{"kv_role": 3}']},
        {"name": "c", "args": ["--kv-transfer-config"]},
        {"name": "c", "command": "python -m vllm --kv-transfer-config x"},
        {"name": "c", "args": [None, 5, {"a": 1}]},
        {"name": "c", "command": ["sh", "-c", "vllm serve m --kv-transfer-config '{\"kv_role"]},
    ],
)
def test_malformed_command_lines_say_nothing(container: dict[str, Any]) -> None:
    assert infer_role(pod(container)) is None


def test_plain_vllm_pod_has_no_role() -> None:
    c = {"name": "vllm", "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"]}
    assert infer_role(pod(c)) is None


@pytest.mark.parametrize(
    "obj",
    [{}, {"spec": None}, {"spec": {"containers": "x"}}, {"metadata": {"labels": None}}, [], None],
)
def test_odd_pod_shapes_do_not_crash(obj: Any) -> None:
    assert infer_role(obj) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_any_json_is_answered_with_a_role_or_none(obj: Any) -> None:
    assert infer_role({"metadata": obj, "spec": {"containers": [obj]}}) in (
        None,
        "prefill",
        "decode",
        "mixed",
    )
