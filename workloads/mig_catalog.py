"""MIG GPU-instance profiles per GPU model and the layouts one GPU can be carved into.

Figures are what `nvidia-smi mig -lgip` prints (profile id, SMs, memory GiB) and what the MIG
user guide's "Supported MIG Profiles" tables give (memory-slice fraction, compute-slice fraction,
placements). A GPU has 7 compute slices and 8 memory slices; a profile occupies a contiguous run
of memory slices starting at one of its allowed placement positions (`nvidia-smi mig -lgipp`),
which is what makes e.g. 3g+3g+1g.10gb invalid (needs 9 memory slices)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import combinations_with_replacement

from workloads.gpu_catalog import MiB, gpu_spec

COMPUTE_SLICES = 7
MEMORY_SLICES = 8


class UnknownMigProfileError(KeyError):
    """A MIG profile that the catalog does not know for that GPU."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class MigProfile:
    """One GPU-instance profile: `g` compute slices of 7, `m` memory slices of 8."""

    gpu: str  # GpuSpec.key
    name: str  # "3g.40gb"
    profile_id: int  # the id nvidia-smi shows (and nvmlDeviceGetGpuInstanceProfileInfo's info.id)
    sm_count: int
    compute_slices: int
    memory_slices: int
    memory_bytes: int
    placements: tuple[int, ...]  # allowed start memory slices (nvidia-smi mig -lgipp)
    media_extensions: bool = False

    @property
    def sm_fraction(self) -> float:
        """Share of the whole GPU's SMs (DESIGN: exactly its SM count / the GPU's)."""
        return self.sm_count / gpu_spec(self.gpu).sm_count

    @property
    def bw_fraction(self) -> float:
        """Share of the GPU's HBM bandwidth: memory slices own their memory controllers."""
        return self.memory_slices / MEMORY_SLICES


def _gib(x: float) -> int:
    """nvidia-smi prints GiB with two decimals (19.62 for 19.625): sizes are multiples of
    1/8 GiB, so snap back to the exact size."""
    return round(x * 8) * 128 * MiB


# Placement start positions are the same on A100, H100 and H200 (MIG user guide, "A100/H100
# placements" figure; `nvidia-smi mig -lgipp`: 19 -> {0..6}:1, 15 -> {0,2,4,6}:2,
# 14 -> {0,2,4}:2, 9 -> {0,4}:4, 5 -> {0}:4, 0 -> {0}:8).
_P1 = (0, 1, 2, 3, 4, 5, 6)
_P1_BIG = (0, 2, 4, 6)
_P2 = (0, 2, 4)
_P3 = (0, 4)
_P4 = (0,)
_P7 = (0,)


def _family(gpu: str, rows: list[tuple[str, int, int, int, int, float, tuple[int, ...]]]):
    out = []
    for name, pid, sms, g, m, gib, placements in rows:
        out.append(MigProfile(gpu, name, pid, sms, g, m, _gib(gib), placements))
        if pid == 19:  # the 1-slice profile also exists once with media extensions (id 20)
            out.append(MigProfile(gpu, name + "+me", 20, sms, g, m, _gib(gib), placements, True))
    return {p.name: p for p in out}


MIG_PROFILES: dict[str, dict[str, MigProfile]] = {
    # H100 80GB HBM3: `nvidia-smi mig -lgip` on H100 SXM5 (driver 535+): SMs 16/26/32/60/64/132,
    # memory 9.75/19.62/19.62/39.50/39.50/79.25 GiB. H100 PCIe shares the table by name (the MIG
    # guide lists one H100 80GB table), but has 114 SMs: SM counts there are not measured by us.
    "H100-SXM": _family(
        "H100-SXM",
        [
            ("1g.10gb", 19, 16, 1, 1, 9.75, _P1),
            ("1g.20gb", 15, 26, 1, 2, 19.62, _P1_BIG),
            ("2g.20gb", 14, 32, 2, 2, 19.62, _P2),
            ("3g.40gb", 9, 60, 3, 4, 39.50, _P3),
            ("4g.40gb", 5, 64, 4, 4, 39.50, _P4),
            ("7g.80gb", 0, 132, 7, 8, 79.25, _P7),
        ],
    ),
    # H200 141GB: profile names and slice fractions from the MIG user guide ("GPU Instance
    # Profiles on H200"); SMs as on H100 (same GH100 die, 132 SMs); memory GiB from
    # `nvidia-smi mig -lgip` on H200 for 1g.18gb (16.00), 1g.35gb/2g.35gb (32.50), 7g.141gb
    # (140.00); 3g.71gb/4g.71gb (66.50) are from the lgip listing as reported in vendor docs,
    # not cross-checked by us.
    "H200": _family(
        "H200",
        [
            ("1g.18gb", 19, 16, 1, 1, 16.00, _P1),
            ("1g.35gb", 15, 26, 1, 2, 32.50, _P1_BIG),
            ("2g.35gb", 14, 32, 2, 2, 32.50, _P2),
            ("3g.71gb", 9, 60, 3, 4, 66.50, _P3),
            ("4g.71gb", 5, 64, 4, 4, 66.50, _P4),
            ("7g.141gb", 0, 132, 7, 8, 140.00, _P7),
        ],
    ),
    # A100-SXM4-80GB: `nvidia-smi mig -lgip`: SMs 14/14/28/42/56/98 (7 GPCs of 14 SMs are usable
    # by MIG, 98 of 108 SMs), memory 9.50/19.50/19.50/39.25/39.25/79.25 GiB.
    "A100-80GB": _family(
        "A100-80GB",
        [
            ("1g.10gb", 19, 14, 1, 1, 9.50, _P1),
            ("1g.20gb", 15, 14, 1, 2, 19.50, _P1_BIG),
            ("2g.20gb", 14, 28, 2, 2, 19.50, _P2),
            ("3g.40gb", 9, 42, 3, 4, 39.25, _P3),
            ("4g.40gb", 5, 56, 4, 4, 39.25, _P4),
            ("7g.80gb", 0, 98, 7, 8, 79.25, _P7),
        ],
    ),
    # A100-SXM4-40GB: `nvidia-smi mig -lgip`: SMs 14/14/28/42/56/98, memory
    # 4.75/9.62/9.62/19.50/19.50/39.25 GiB (the GiB column moves by ~0.12 across drivers).
    "A100-40GB": _family(
        "A100-40GB",
        [
            ("1g.5gb", 19, 14, 1, 1, 4.75, _P1),
            ("1g.10gb", 15, 14, 1, 2, 9.62, _P1_BIG),
            ("2g.10gb", 14, 28, 2, 2, 9.62, _P2),
            ("3g.20gb", 9, 42, 3, 4, 19.50, _P3),
            ("4g.20gb", 5, 56, 4, 4, 19.50, _P4),
            ("7g.40gb", 0, 98, 7, 8, 39.25, _P7),
        ],
    ),
}
# H100 PCIe 80GB uses the H100 80GB profile names; its SMs per GPC differ (114 SMs enabled) and
# we do not have a measured lgip listing, so it is deliberately not in the catalog.


def mig_profiles(gpu: str) -> dict[str, MigProfile]:
    """All profiles of a GPU (product name or key); empty for a GPU without MIG in the catalog."""
    return MIG_PROFILES.get(gpu_spec(gpu).key, {})


def mig_profile(gpu: str, name: str) -> MigProfile:
    """Look a profile up by name ("3g.40gb", case-insensitive, optional "MIG " prefix)."""
    key = gpu_spec(gpu).key
    profiles = MIG_PROFILES.get(key)
    if not profiles:
        raise UnknownMigProfileError(f"GPU {key} has no MIG profiles in the catalog")
    clean = name.strip()
    if clean.lower().startswith("mig "):
        clean = clean[4:].strip()
    for pname, prof in profiles.items():
        if pname.lower() == clean.lower():
            return prof
    known = ", ".join(profiles)
    raise UnknownMigProfileError(f"unknown MIG profile {name!r} for {key} (known: {known})")


def find_mig_profile(gpu: str, name: str) -> MigProfile | None:
    """Like mig_profile, but None when either the GPU or the profile is unknown."""
    try:
        return mig_profile(gpu, name)
    except KeyError:
        return None


def _fits(profiles: list[MigProfile]) -> bool:
    """Backtracking placement: can every profile get a start slot without overlap?"""
    if sum(p.compute_slices for p in profiles) > COMPUTE_SLICES:
        return False
    if sum(p.memory_slices for p in profiles) > MEMORY_SLICES:
        return False
    order = sorted(profiles, key=lambda p: (-p.memory_slices, len(p.placements)))

    def place(i: int, used: int) -> bool:
        if i == len(order):
            return True
        p = order[i]
        for start in p.placements:
            mask = ((1 << p.memory_slices) - 1) << start
            fits = start + p.memory_slices <= MEMORY_SLICES and not used & mask
            if fits and place(i + 1, used | mask):
                return True
        return False

    return place(0, 0)


def is_valid_layout(gpu: str, names: list[str] | tuple[str, ...]) -> bool:
    """Whether these profiles (with repeats) can coexist on one GPU of this model."""
    profiles = [mig_profile(gpu, n) for n in names]
    if sum(p.media_extensions for p in profiles) > 1:
        return False
    return bool(profiles) and _fits(profiles)


@cache
def valid_layouts(gpu: str) -> tuple[tuple[str, ...], ...]:
    """Every maximal multiset of (non-media) profiles one GPU can hold, largest profiles first.

    Maximal: no further profile fits beside them (the layouts an operator would pick; any subset
    of one is valid too, see is_valid_layout)."""
    key = gpu_spec(gpu).key
    base = [p for p in MIG_PROFILES.get(key, {}).values() if not p.media_extensions]
    found: list[tuple[str, ...]] = []
    for k in range(1, COMPUTE_SLICES + 1):
        for combo in combinations_with_replacement(base, k):
            if not _fits(list(combo)):
                continue
            if any(_fits([*combo, extra]) for extra in base):
                continue
            ordered = sorted(combo, key=lambda p: (-p.compute_slices, -p.memory_slices, p.name))
            found.append(tuple(p.name for p in ordered))
    return tuple(sorted(set(found), key=lambda t: (len(t), t)))
