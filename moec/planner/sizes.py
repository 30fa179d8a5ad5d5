"""The size model: what an expert's weights take, packed as planned or on the target that stores them.

Without a target, every width is packed as planned with a float32 scale per group (MC-MoE's own
accounting, in which its 1- and 3-bit widths are what they say). With one, a width is stored in
the target kernel's container for it (CPU MatMulNBits: 1-bit codes in 2-bit, 3-bit in 4-bit; CUDA:
2-bit in 4-bit) with scales in the target's float type (float16 on CUDA): what actually ships.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from moec.planner.checks import PlanError, _fraction, _positive_int, _show

FLOAT = "float"  # a plan's width for a weight it keeps unquantized (plan files before it wrote 16)
DROPPED = 0  # a plan's width for an expert it drops: no weights, never routed to
FLOAT_BYTES = 4  # an unquantized expert is written as the traced graph holds it: float32
SCALE_BYTES = FLOAT_BYTES  # packed as planned: float32 scales


def _storage(bits: int, target: str | None) -> tuple[int, int]:
    """(bits stored per weight, bytes per scale) of a `bits`-bit expert, packed or on `target`."""
    if target is None:
        return bits, SCALE_BYTES
    from moec.targets import get_target

    storage = get_target(target)
    return storage.container_bits[bits], storage.scale_bytes


def expert_bytes(params: int, bits: int, group_size: int = 128, target: str | None = None) -> int:
    """Stored bytes of one expert at `bits` (on `target`, if given), so budgets count what ships.

    Asymmetric RTN with groups of `group_size` along the input dimension: packed codes, plus per
    group a scale and a packed zero point. FLOAT is unquantized (float32); DROPPED takes nothing.
    Assumes each matrix's input dimension is a multiple of `group_size` (true for every supported family).
    """
    _positive_int(params, "params")
    _positive_int(group_size, "group_size")
    if bits == FLOAT:
        return FLOAT_BYTES * params
    if bits == DROPPED:
        return 0
    _positive_int(bits, "bits")
    stored, scale_bytes = _storage(bits, target)
    groups = -(-params // group_size)
    return -(-params * stored // 8) + scale_bytes * groups + -(-groups * stored // 8)


def matrix_bytes(rows: int, columns: int, bits: int, group_size: int = 128, target: str | None = None) -> int:
    """Stored bytes of a [rows, columns] weight at `bits` (on `target`, if given), grouped along its
    columns as MatMulNBits and GatherBlockQuantized store it: each row's codes in whole groups, a scale
    per group and its zero points packed to whole bytes. FLOAT is unquantized (float32)."""
    if bits == FLOAT:
        return FLOAT_BYTES * rows * columns
    stored, scale_bytes = _storage(bits, target)
    groups = -(-columns // group_size)
    return rows * (groups * group_size * stored // 8 + scale_bytes * groups + -(-groups * stored // 8))


def avg_bits_budget_bytes(avg_bits: float, params_per_expert: int, num_experts: int, group_size: int = 128,
                          target: str | None = None) -> int:
    """Byte budget equivalent to `avg_bits` per weight: what all experts would take at a uniform (possibly
    fractional) `avg_bits`, zero points included, scales (the target's) added. Equals the sum of
    expert_bytes for an integer `avg_bits` stored without a larger container."""
    avg = _fraction(avg_bits, "avg_bits")
    _positive_int(params_per_expert, "params_per_expert")
    _positive_int(num_experts, "num_experts")
    groups = -(-params_per_expert // _positive_int(group_size, "group_size"))
    scale_bytes = _storage(1, target)[1]
    return math.floor(num_experts * ((params_per_expert + groups) * avg / 8 + scale_bytes * groups))


def _bytes_to_avg_bits(budget: int, params_per_expert: int, num_experts: int, group_size: int,
                       target: str | None = None) -> float:
    """Smallest avg_bits (4 decimals, rounded up) whose byte budget covers `budget`."""
    groups = -(-params_per_expert // group_size)
    scale_bytes = _storage(1, target)[1]
    avg = Fraction(8 * (Fraction(budget, num_experts) - scale_bytes * groups), params_per_expert + groups)
    return math.ceil(avg * 10_000) / 10_000


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from a size like "3.5GB" (decimal units), "1.2GiB" (binary units), "800MB" or a plain int."""
    if type(text) is int and text > 0:
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", text) if isinstance(text, str) else None
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise PlanError(f"size {_show(text)}: expected a number with a unit like 800MB, 3.5GB or 1.2GiB")
    size = round(Fraction(match.group(1)) * unit)
    if size <= 0:
        raise PlanError(f"size {_show(text)}: must be more than 0 bytes")
    return size


def _format_bytes(size: int) -> str:
    return f"{size / 10**9:.3f} GB" if size >= 10**8 else f"{size / 10**6:.3f} MB"
