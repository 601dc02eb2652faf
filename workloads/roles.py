"""Which serving role a pod plays (prefill, decode or mixed), read from what it already says.

copack schedules P/D deployments of other projects unchanged, so the role comes from the
signals those deployments already carry: the vLLM command line (`kv_role` in
`--kv-transfer-config`), our own launcher's `--role`, the disaggregation flags of SGLang and
NVIDIA Dynamo, and the role labels of llm-d, NVIDIA Dynamo and AIBrix. The command line wins
over labels because it is what actually runs. The `copack.io/role` annotation is not read
here: it is the user's explicit override and its parser handles it before falling back to this.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PREFILL = "prefill"
DECODE = "decode"
MIXED = "mixed"
ROLES: tuple[str, ...] = (PREFILL, DECODE, MIXED)

KV_ROLE_TO_ROLE: dict[str, str] = {
    "kv_producer": PREFILL,
    "kv_consumer": DECODE,
    "kv_both": MIXED,
}

# Role labels of other P/D stacks and how their values map to ours.
LLMD_ROLE_LABEL = "llm-d.ai/role"  # llm-d inference scheduler: prefill | decode | both
DYNAMO_ROLE_LABEL = "nvidia.com/dynamo-sub-component-type"  # Dynamo operator: prefill | decode
AIBRIX_ROLE_LABEL = "role-name"  # AIBrix StormService RoleSet: the role's name, e.g. prefill
ROLE_LABELS: tuple[str, ...] = (LLMD_ROLE_LABEL, DYNAMO_ROLE_LABEL, AIBRIX_ROLE_LABEL)

_LABEL_VALUES: dict[str, str] = {
    "prefill": PREFILL,
    "prefiller": PREFILL,
    "decode": DECODE,
    "decoder": DECODE,
    "both": MIXED,
    "mixed": MIXED,
}

_KV_CONFIG_FLAG = "--kv-transfer-config"
_KV_ROLE_DOTTED = "--kv-transfer-config.kv_role"
_DISAGG_MODE_FLAG = "--disaggregation-mode"  # SGLang and Dynamo: prefill | decode | null


def role_from_kv_role(kv_role: str) -> str | None:
    """Map vLLM's `kv_role` to a copack role; None for an unknown value."""
    return KV_ROLE_TO_ROLE.get(kv_role.strip().lower())


def role_from_label_value(value: str) -> str | None:
    """Map a role label's value (any of the stacks above) to a copack role."""
    return _LABEL_VALUES.get(value.strip().lower())


def _tokens(words: Iterable[Any]) -> list[str]:
    """Split the container's command and args into argv words.

    Pods often run `sh -c "python -m vllm... --kv-transfer-config '{...}'"`; a word that holds
    a whole script is split the way the shell would, so flags inside it are seen too.
    """
    out: list[str] = []
    for word in words:
        if not isinstance(word, str):
            continue
        stripped = word.strip()
        looks_like_script = (
            any(ch.isspace() for ch in stripped)
            and "--" in stripped
            and not stripped.startswith(("-", "{", "["))  # a flag or a JSON value, not a script
        )
        if looks_like_script:
            try:
                out.extend(shlex.split(word))
            except ValueError:  # unbalanced quotes: the shell would fail too; use what we can
                out.extend(word.split())
        else:
            out.append(word)
    return out


def _flag_value(argv: Sequence[str], i: int, flag: str) -> str | None:
    """The value of `flag` at argv[i], in either `--flag value` or `--flag=value` form."""
    word = argv[i]
    if word == flag:
        return argv[i + 1] if i + 1 < len(argv) else None
    if word.startswith(flag + "="):
        return word[len(flag) + 1 :]
    return None


def _kv_role_in_json(text: str) -> str | None:
    try:
        cfg = json.loads(text)
    except ValueError:
        return None
    if not isinstance(cfg, Mapping):
        return None
    kv_role = cfg.get("kv_role")
    return role_from_kv_role(kv_role) if isinstance(kv_role, str) else None


def role_from_command(argv: Sequence[str]) -> str | None:
    """The role a command line asks for, or None if it says nothing about one.

    Recognised: vLLM `--kv-transfer-config '{"kv_role": ...}'` (and the dotted
    `--kv-transfer-config.kv_role X` form), `copack workload serve --role X`, Dynamo's
    `--is-prefill-worker`/`--is-decode-worker` and `--disaggregation-mode prefill|decode`.
    """
    words = _tokens(argv)
    found: str | None = None
    is_copack_serve = "workload" in words and "serve" in words
    for i, word in enumerate(words):
        role: str | None = None
        if (value := _flag_value(words, i, _KV_CONFIG_FLAG)) is not None:
            role = _kv_role_in_json(value)
        elif (value := _flag_value(words, i, _KV_ROLE_DOTTED)) is not None:
            role = role_from_kv_role(value)
        elif (value := _flag_value(words, i, _DISAGG_MODE_FLAG)) is not None or (
            is_copack_serve and (value := _flag_value(words, i, "--role")) is not None
        ):
            role = role_from_label_value(value)
        elif word == "--is-prefill-worker":
            role = PREFILL
        elif word == "--is-decode-worker":
            role = DECODE
        if role is not None:
            found = role  # the last occurrence wins, as with argparse
    return found


def _containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        return []
    containers = spec.get("containers")
    if not isinstance(containers, list):
        return []
    return [c for c in containers if isinstance(c, Mapping)]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def role_from_labels(labels: Mapping[str, Any] | None) -> str | None:
    """The role given by llm-d, Dynamo or AIBrix labels (checked in that order)."""
    if not isinstance(labels, Mapping):
        return None
    for key in ROLE_LABELS:
        value = labels.get(key)
        if isinstance(value, str) and (role := role_from_label_value(value)) is not None:
            return role
    return None


def infer_role(pod: Mapping[str, Any]) -> str | None:
    """The role of a pod given as the API serves it (a JSON dict), or None if nothing says.

    Containers' command lines come first; if containers disagree (one prefill and one decode
    engine in one pod) the pod is `mixed`. Then the role labels. Malformed parts (a
    `--kv-transfer-config` that is not JSON, a label of another type) are ignored rather than
    raised: the pod is someone else's and scheduling must still proceed.
    """
    if not isinstance(pod, Mapping):
        return None
    roles: set[str] = set()
    for container in _containers(pod):
        argv = [
            *_as_list(container.get("command")),
            *_as_list(container.get("args")),
        ]
        role = role_from_command(argv)
        if role is not None:
            roles.add(role)
    if len(roles) == 1:
        return roles.pop()
    if roles:
        return MIXED
    metadata = pod.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, Mapping) else None
    return role_from_labels(labels)
