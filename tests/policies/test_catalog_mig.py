"""MIG profiles against `nvidia-smi mig -lgip` figures and layout rules (FACTS.md)."""

from __future__ import annotations

import pytest

from workloads.gpu_catalog import GiB, gpu_spec
from workloads.mig_catalog import (
    COMPUTE_SLICES,
    MEMORY_SLICES,
    MIG_PROFILES,
    UnknownMigProfileError,
    find_mig_profile,
    is_valid_layout,
    mig_profile,
    mig_profiles,
    valid_layouts,
)

# gpu: {profile: (profile id, SMs, compute slices, memory slices, GiB as nvidia-smi prints)}
LGIP = {
    "H100-SXM": {
        "1g.10gb": (19, 16, 1, 1, 9.75),
        "1g.20gb": (15, 26, 1, 2, 19.62),
        "2g.20gb": (14, 32, 2, 2, 19.62),
        "3g.40gb": (9, 60, 3, 4, 39.50),
        "4g.40gb": (5, 64, 4, 4, 39.50),
        "7g.80gb": (0, 132, 7, 8, 79.25),
    },
    "A100-80GB": {
        "1g.10gb": (19, 14, 1, 1, 9.50),
        "1g.20gb": (15, 14, 1, 2, 19.50),
        "2g.20gb": (14, 28, 2, 2, 19.50),
        "3g.40gb": (9, 42, 3, 4, 39.25),
        "4g.40gb": (5, 56, 4, 4, 39.25),
        "7g.80gb": (0, 98, 7, 8, 79.25),
    },
    "A100-40GB": {
        "1g.5gb": (19, 14, 1, 1, 4.75),
        "1g.10gb": (15, 14, 1, 2, 9.62),
        "2g.10gb": (14, 28, 2, 2, 9.62),
        "3g.20gb": (9, 42, 3, 4, 19.50),
        "4g.20gb": (5, 56, 4, 4, 19.50),
        "7g.40gb": (0, 98, 7, 8, 39.25),
    },
    "H200": {
        "1g.18gb": (19, 16, 1, 1, 16.00),
        "1g.35gb": (15, 26, 1, 2, 32.50),
        "2g.35gb": (14, 32, 2, 2, 32.50),
        "3g.71gb": (9, 60, 3, 4, 66.50),
        "4g.71gb": (5, 64, 4, 4, 66.50),
        "7g.141gb": (0, 132, 7, 8, 140.00),
    },
}


def test_catalog_covers_the_four_mig_gpus() -> None:
    assert set(MIG_PROFILES) == set(LGIP)


@pytest.mark.parametrize(("gpu", "name"), [(g, p) for g, profs in LGIP.items() for p in profs])
def test_profile_figures(gpu: str, name: str) -> None:
    pid, sms, g, m, gib = LGIP[gpu][name]
    p = mig_profile(gpu, name)
    assert (p.profile_id, p.sm_count, p.compute_slices, p.memory_slices) == (pid, sms, g, m)
    # nvidia-smi prints GiB rounded to 2 decimals.
    assert p.memory_bytes / GiB == pytest.approx(gib, abs=0.006)
    # DESIGN.md: g compute slices have exactly SM count / GPU SMs of the SMs, m/8 of bandwidth.
    assert p.sm_fraction == pytest.approx(sms / gpu_spec(gpu).sm_count)
    assert p.bw_fraction == pytest.approx(m / 8)
    assert p.memory_bytes < gpu_spec(gpu).memory_bytes
    # the name's "Ng" is the compute slice count
    assert name.startswith(f"{g}g.")


def test_design_example_unit() -> None:
    # DESIGN.md inventory example: H100 3g.40gb has 60 SMs and 42,412,802,048 bytes.
    p = mig_profile("NVIDIA H100 80GB HBM3", "3g.40gb")
    assert p.sm_count == 60 and p.memory_bytes == 42412802048
    assert p.sm_fraction == pytest.approx(60 / 132)
    assert p.bw_fraction == 0.5


def test_media_extension_variant() -> None:
    me = mig_profile("H100-SXM", "1g.10gb+me")
    assert me.profile_id == 20 and me.media_extensions
    assert not is_valid_layout("H100-SXM", ["1g.10gb+me", "1g.10gb+me"])
    assert is_valid_layout("H100-SXM", ["1g.10gb+me"] + ["1g.10gb"] * 6)


@pytest.mark.parametrize(
    ("layout", "ok"),
    [
        (["3g.40gb", "3g.40gb"], True),
        (["4g.40gb", "2g.20gb", "1g.10gb"], True),
        (["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"], True),
        (["2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"], True),
        (["1g.10gb"] * 7, True),
        (["7g.80gb"], True),
        (["4g.40gb", "3g.40gb"], True),
        (["3g.40gb", "3g.40gb", "1g.10gb"], False),  # 9 memory slices (FACTS.md)
        (["1g.10gb"] * 8, False),  # 8 compute slices
        (["7g.80gb", "1g.10gb"], False),
        (["4g.40gb", "4g.40gb"], False),  # a 4g only starts at slice 0
        (["1g.20gb"] * 5, False),
    ],
)
def test_layout_rules_from_facts(layout: list[str], ok: bool) -> None:
    assert is_valid_layout("NVIDIA H100 80GB HBM3", layout) is ok


@pytest.mark.parametrize("gpu", sorted(LGIP))
def test_valid_layouts_are_valid_and_maximal(gpu: str) -> None:
    layouts = valid_layouts(gpu)
    assert layouts, gpu
    profs = mig_profiles(gpu)
    base = [n for n, p in profs.items() if not p.media_extensions]
    for layout in layouts:
        ps = [profs[n] for n in layout]
        assert sum(p.compute_slices for p in ps) <= COMPUTE_SLICES
        assert sum(p.memory_slices for p in ps) <= MEMORY_SLICES
        assert is_valid_layout(gpu, list(layout))
        assert not any(is_valid_layout(gpu, [*layout, extra]) for extra in base)
    full = {tuple(sorted(layout)) for layout in layouts}
    big = max(base, key=lambda n: profs[n].compute_slices)
    assert (big,) in full
    assert len(layouts) == len(set(layouts))


def test_unknown_profile_errors() -> None:
    with pytest.raises(UnknownMigProfileError, match=r"5g\.50gb"):
        mig_profile("H100-SXM", "5g.50gb")
    with pytest.raises(UnknownMigProfileError, match="no MIG profiles"):
        mig_profile("L40S", "1g.10gb")
    assert find_mig_profile("L4", "1g.5gb") is None
    assert mig_profile("H100-SXM", "MIG 3g.40gb").name == "3g.40gb"
