"""What every benchmark records with its figures: date, commit, device, the exact command."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

# where --save appends: bench/results/, or the folder a prepared run (bench/gpu_run.sh) names
RESULTS = Path(os.environ.get("CHATAPP_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
# set by bench/gpu_run.sh --dry-run: each benchmark parses its arguments and exits
DRY_RUN = "CHATAPP_BENCH_DRY_RUN"


def parse_args(ap):
    """``ap.parse_args()``; in a dry run, exits (0) once the arguments have parsed."""
    args = ap.parse_args()
    if os.environ.get(DRY_RUN):
        print(f"{Path(sys.argv[0]).name}: arguments parse: {vars(args)}")
        raise SystemExit(0)
    return args


def cpu_model() -> str:
    """The CPU's model name and its widest vector instructions (our machines differ in both)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = next((f for f in ("avx512f", "avx2") if f in flags), None)
    return f"{name}, {isa}" if isa else name


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def metadata(bench: str) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    out = {"bench": bench, "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
           "device": device_name(), "torch": torch.__version__,
           "command": "python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])}
    if torch.cuda.is_available():  # the most the benchmark's tensors held at once
        out["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
    return out


def record(bench: str, result, args=None, save: bool = False) -> dict:
    """Print the summary line; with save, append it to bench/results/<bench>.jsonl."""
    summary = {**metadata(bench), "result": result} if not isinstance(result, dict) else {**metadata(bench), **result}
    print(json.dumps(summary))
    if save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with (RESULTS / f"{bench}.jsonl").open("a") as f:
            f.write(json.dumps(summary) + "\n")
    return summary
