"""Compile kvxfer's CUDA sources with NVRTC on a machine without a GPU and print each entry's registers and spills.

The launchers compile csrc/kv_copy.cu (and kv_copy.cu + id_copy.cu for the block-id kernel) with cupy's NVRTC at
run time; this does the same compile ahead of a GPU run, so a syntax error or a register spill shows up on the CPU
machine. Needs NVRTC's library only: ``pip install --target /tmp/nvrtc nvidia-cuda-nvrtc`` (not a project
dependency), then

    python scripts/nvrtc_check.py --nvrtc /tmp/nvrtc [--arch sm_90] [--only ids]

Exit status 1 if the compile fails or (with ``--no-spills``) any entry spills.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "kvxfer" / "kernels" / "csrc"
#: The -D options of kernels.launch.DEFAULT_TUNING (what the launchers pass).
DEFINES = [
    "-DKVXFER_THREADS=256",
    "-DKVXFER_UNROLL=4",
    "-DKVXFER_PREFETCH=1",
    "-DKVXFER_MIN_CTAS=5",
    "-DKVXFER_STREAMING=0",
]


def _library(root: Path) -> ctypes.CDLL:
    found = sorted(root.rglob("libnvrtc.so*"), key=lambda p: len(p.name))
    if not found:
        sys.exit(f"no libnvrtc.so under {root} (pip install --target {root} nvidia-cuda-nvrtc)")
    return ctypes.CDLL(str(found[0]))


def compile_log(lib: ctypes.CDLL, code: str, options: list[str]) -> tuple[int, str]:
    """(NVRTC result, compile log with ptxas's report) of one program."""
    program = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(program), code.encode(), b"kvxfer.cu", 0, None, None) != 0:
        sys.exit("nvrtcCreateProgram failed")
    argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    result = lib.nvrtcCompileProgram(program, len(options), argv)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    return int(result), log.value.decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvrtc", type=Path, required=True, help="a folder holding libnvrtc.so (searched)")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--only", default="", help="print only entries whose name contains this")
    parser.add_argument("--no-spills", action="store_true", help="fail if an entry spills registers")
    args = parser.parse_args()
    code = (CSRC / "kv_copy.cu").read_text() + "\n" + (CSRC / "id_copy.cu").read_text()
    options = ["--std=c++17", f"--gpu-architecture={args.arch}", "--ptxas-options=-v", *DEFINES]
    result, log = compile_log(_library(args.nvrtc), code, options)
    if result != 0:
        print(log)
        sys.exit(f"NVRTC failed ({result})")
    spilled = False
    for name, body in re.findall(r"Function properties for (\w+)\n(.*?)(?=ptxas info    : Compile time)", log, re.S):
        if args.only not in name:
            continue
        registers = re.search(r"Used (\d+) registers", body)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        stores, loads = (int(spills.group(1)), int(spills.group(2))) if spills else (0, 0)
        spilled |= stores + loads > 0
        used = registers.group(1) if registers else "?"
        print(f"{name:<28} registers {used:>3}  spill stores {stores:4} loads {loads:4}")
    if spilled and args.no_spills:
        sys.exit("an entry spills registers")


if __name__ == "__main__":
    main()
