"""Which waiting requests join which decode pod, as vLLM admits them by free KV blocks.

A request joins the pod with the fewest running requests among those with a free sequence slot
(`--max-num-seqs`) and room in their KV cache for its prompt beside the tokens their running
requests hold now; a pod with nothing running takes any request (vLLM refuses longer ones at
the API, by `--max-model-len`). First come, first served: the first request no pod can take
waits, and those behind it too (vLLM's scheduler stops at the first request it cannot
allocate). Growth past the cache, which vLLM answers by preempting, is not modelled.
"""

from __future__ import annotations

import numpy as np


def admit(
    running: np.ndarray, slots: np.ndarray, room_tokens: np.ndarray, prompts: np.ndarray
) -> tuple[int, np.ndarray]:
    """(how many of `prompts`, in order, join; the pod index of each). Per pod: `running`
    requests, `slots` sequence slots, `room_tokens` free KV tokens."""
    load = running.tolist()
    seqs = (slots - running).tolist()
    room = room_tokens.tolist()
    picks: list[int] = []
    for need in prompts.tolist():
        best = -1
        for k in range(len(load)):
            if seqs[k] > 0 and (room[k] >= need or load[k] == 0) and (
                best < 0 or load[k] < load[best]
            ):
                best = k
        if best < 0:
            break
        picks.append(best)
        load[best] += 1
        seqs[best] -= 1
        room[best] -= need
    return len(picks), np.asarray(picks, np.int64)
