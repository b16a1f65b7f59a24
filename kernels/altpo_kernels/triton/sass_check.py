"""Static checks of compiled SASS: wgmma register-operand hazards around loops, and spills.

Hopper's warpgroup MMA (``HGMMA`` in SASS) can take its A operand from registers. ptxas has been
seen to keep such an operand in registers across a loop back-edge while reusing the same registers
later in the loop body for something else (the dW operand of this project's first fused backward:
``LDSM.16.MT88.4 R40..`` after ``HGMMA.64x32x16 R24, R40, ...``, with nothing reloading R40 before
the next iteration's HGMMA), so from the second iteration on the MMA reads the wrong values. This
is the register-reuse hazard class around asynchronous wgmma (triton PR 11781, issue 9433). The
Triton interpreter cannot see it; tests that read the SASS can.

:func:`wgmma_register_hazards` reports, for every loop (a backward branch) and every HGMMA inside
it whose A operand is a register range, each register of that range that is

* written later in the same loop body (after the HGMMA, before the back-edge), and
* not written earlier in the loop body (before the HGMMA),

i.e. live around the back-edge yet clobbered inside the loop. :func:`spill_instructions` counts
local-memory traffic (``STL``/``LDL``), which is what a register spill compiles to.
:func:`atomic_instructions` lists atomics and memory reductions (``ATOM``, ``ATOMG``, ``ATOMS``,
``RED``, ``REDG``, ``REDAS``): their order across threads and blocks is not fixed, so float sums
built with them differ in their last bits from run to run; no shipped kernel may contain one.

The parser reads ``cuobjdump -sass`` text: ``/*addr*/ [@pred] OPCODE operands ;`` lines and either
``BRA 0x5e30`` or ``BRA `(.L_x_3)`` targets with ``.L_x_3:`` labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
_REG = re.compile(r"^-?\|?R(\d+)\|?(\.reuse)?$")
_HGMMA_SHAPE = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32")


@dataclass
class Instruction:
    addr: int
    opcode: str
    operands: list[str]
    text: str


def parse_sass(text: str) -> tuple[list[Instruction], dict[str, int]]:
    """Instructions in address order, and label -> address of the instruction after it."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _LINE.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        operands = [o.strip() for o in _split_operands(m.group(4))]
        instrs.append(Instruction(addr, m.group(3), operands, line.strip()))
    return instrs, labels


def _split_operands(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def _reg(operand: str) -> int | None:
    m = _REG.match(operand.strip())
    return int(m.group(1)) if m else None


def _dest_width(ins: Instruction) -> int:
    op = ins.opcode
    if op.startswith("HGMMA"):
        m = _HGMMA_SHAPE.match(op)
        return int(m.group(1)) * int(m.group(2)) // 128 if m else 1
    if op.startswith("HMMA") or op.startswith("IMMA"):
        return 4 if ".F32" in op or ".S32" in op else 2
    if op.startswith("LDSM"):
        return int(op.rsplit(".", 1)[-1]) if op.rsplit(".", 1)[-1] in ("1", "2", "4") else 4
    parts = op.split(".")
    if "128" in parts:
        return 4
    if "64" in parts or "WIDE" in parts or op.startswith(("D", "I2F.F64", "F2F.F64")):
        return 2
    return 1


def written_registers(ins: Instruction) -> set[int]:
    """General registers an instruction writes (conservative about predicated writes: counted)."""
    ops = ins.operands
    if not ops:
        return set()
    first = ops[0]
    if re.match(r"^!?U?P[T0-9]+$", first) and len(ops) > 1 and ins.opcode.startswith("SHFL"):
        first = ops[1]  # SHFL writes a predicate, then the register
    r = _reg(first)
    if r is None or first.strip() == "RZ":
        return set()
    return set(range(r, r + _dest_width(ins)))


def hgmma_register_operand(ins: Instruction) -> set[int]:
    """Registers of an HGMMA's A operand when it comes from registers (4 per thread), else empty."""
    if not ins.opcode.startswith("HGMMA") or len(ins.operands) < 2:
        return set()
    r = _reg(ins.operands[1])
    return set(range(r, r + 4)) if r is not None else set()


def _branch_target(ins: Instruction, labels: dict[str, int]) -> int | None:
    if not ins.opcode.startswith(("BRA", "JMP")) or not ins.operands:
        return None
    target = ins.operands[-1].strip()
    m = re.search(r"0x([0-9a-fA-F]+)", target)
    if m:
        return int(m.group(1), 16)
    m = re.search(r"(\.L_\w+)", target)
    return labels.get(m.group(1)) if m else None


def loops(instrs: list[Instruction], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(start, end) address ranges closed by a backward branch (end = the branch's address)."""
    out = []
    for ins in instrs:
        target = _branch_target(ins, labels)
        if target is not None and target < ins.addr:
            out.append((target, ins.addr))
    return out


def wgmma_register_hazards(sass: str) -> list[str]:
    """One message per HGMMA register operand clobbered inside its loop without a reload."""
    instrs, labels = parse_sass(sass)
    found = []
    for start, end in loops(instrs, labels):
        body = [i for i in instrs if start <= i.addr <= end]
        for k, mma in enumerate(body):
            regs = hgmma_register_operand(mma)
            if not regs:
                continue
            before = set().union(*(written_registers(i) for i in body[:k])) if k else set()
            for later in body[k + 1:]:
                bad = (written_registers(later) & regs) - before
                if bad:
                    found.append(
                        f"loop 0x{start:04x}-0x{end:04x}: {mma.opcode} at 0x{mma.addr:04x} reads "
                        f"R{min(regs)}..R{max(regs)} from registers; {later.opcode} at "
                        f"0x{later.addr:04x} overwrites R{min(bad)} later in the loop and nothing "
                        f"reloads it before the next iteration's HGMMA")
                    break
    return found


def spill_instructions(sass: str) -> int:
    """Local-memory loads and stores (``LDL``/``STL``): register spills in compiled kernels."""
    instrs, _ = parse_sass(sass)
    return sum(1 for i in instrs if i.opcode.split(".")[0] in ("LDL", "STL"))


def hgmma_count(sass: str) -> int:
    instrs, _ = parse_sass(sass)
    return sum(1 for i in instrs if i.opcode.startswith("HGMMA"))


# Opcode families that read-modify-write memory atomically. REDUX (a warp-wide register reduction,
# fixed order) and reductions inside one thread are not among them.
ATOMIC_OPCODES = ("ATOM", "ATOMG", "ATOMS", "RED", "REDG", "REDAS")


def atomic_instructions(sass: str) -> list[str]:
    """Every atomic or memory-reduction instruction of the SASS, as ``"0xADDR OPCODE"``."""
    instrs, _ = parse_sass(sass)
    return [f"0x{i.addr:04x} {i.opcode}" for i in instrs if i.opcode.split(".")[0] in ATOMIC_OPCODES]
