"""Reference data the product reads, shipped as package data so a wheel or a bare clone has it.

`COPACK_DATA_DIR` points the lookups at another folder (other traces of the same names); see
README.md beside this file for each file's source and licence.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "COPACK_DATA_DIR"
PACKAGE_DATA = Path(__file__).resolve().parent

# Short names of the bundled traces (Azure LLM inference 2023) -> file names.
TRACE_FILES: dict[str, str] = {
    "code": "azure_llm_2023_code.csv",
    "conv": "azure_llm_2023_conv.csv",
}
MUXSERVE_PROFILE = "muxserve_llama_a100_profile.json"


def data_dir() -> Path:
    """`$COPACK_DATA_DIR` when set, else the data shipped inside the package."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else PACKAGE_DATA


def data_file(name: str) -> Path:
    return data_dir() / name


def trace_file(name: str) -> Path:
    """A bundled trace by short name (`code`, `conv`), or `name` itself as a path."""
    return data_file(TRACE_FILES[name]) if name in TRACE_FILES else Path(name)
