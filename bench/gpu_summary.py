"""The summary table of a prepared GPU run (bench/gpu_run.sh): GPU, each step's status, decode
tokens/s bf16 vs FP8 vs the roofline, the FP8 GEMM against torch._scaled_mm, Medusa tokens per
step and speed-up at the Llama-3.1-8B shape, DMC bytes and speed-up at the Llama-2-7B shape, and
the peak VRAM, as Markdown.

    python bench/gpu_summary.py bench/results/gpu_run/<date>
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

GIB = 1 << 30


def last_record(folder: Path, bench: str) -> dict | None:
    path = folder / f"{bench}.jsonl"
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def steps(folder: Path) -> list[tuple[str, str, str]]:
    path = folder / "steps.tsv"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds = line.split("\t")
        status = {"0": "ok", "124": "stopped at its limit"}.get(rc, f"failed (exit {rc})")
        if name == "tests":
            log = folder / "tests.log"
            found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?) in [\d.]+s", log.read_text(),
                               re.M) if log.exists() else []
            if found:
                status += f": {found[-1].strip('= ')}"
        rows.append((name, status, seconds))
    return rows


def ratio_summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):.2f}x (min {min(values):.2f}, max {max(values):.2f})"


def figures(folder: Path) -> list[tuple[str, str]]:
    out = []
    e2e = last_record(folder, "decode_e2e")
    if e2e:
        rows = {r["weights"]: r for r in e2e["result"]}
        for weights, r in rows.items():
            out.append((f"decode {weights} ({e2e['shape']}, batch 1, context {e2e['context']}"
                        f"{', CUDA graph' if e2e.get('cuda_graphs') else ''})",
                        f"{r['tok_s']} tok/s = {r['fraction_of_roofline']:.0%} of the roofline {r['roofline_tok_s']} "
                        f"(copy bandwidth {e2e['copy_bandwidth_gbs']} GB/s)"))
        if "fp8" in rows and len(rows) > 1:
            base = next(r for w, r in rows.items() if w != "fp8")
            out.append((f"decode fp8 / {base['weights']}", f"{rows['fp8']['tok_s'] / base['tok_s']:.2f}x"))
    else:
        out.append(("decode bf16 / FP8", "not run"))
    gemm = last_record(folder, "fp8_gemm")
    if gemm:
        rows = gemm["result"]
        for label, pick in (("decode (M <= 16)", lambda m: m <= 16), ("prefill (M > 16)", lambda m: m > 16)):
            ratios = [r["ours_vs_scaled_mm"] for r in rows if pick(r["M"]) and "ours_vs_scaled_mm" in r]
            speed = [r["speedup_vs_bf16"] for r in rows if pick(r["M"]) and "speedup_vs_bf16" in r]
            out.append((f"FP8 GEMM {label}: ours vs torch._scaled_mm (>1: ours faster)", ratio_summary(ratios)))
            out.append((f"FP8 GEMM {label}: ours vs bf16 matmul", ratio_summary(speed)))
    else:
        out.append(("FP8 GEMM", "not run"))
    medusa = last_record(folder, "medusa_decode_8b")
    if medusa:
        best = medusa["best"]
        out.append((f"Medusa ({medusa['shape']}, {medusa['weights']}, context {medusa['context']})",
                    f"best tree {best['nodes']} nodes: {best['expected_tokens_per_step']} tokens/step (profile), "
                    f"step {best['step_ms']} ms vs plain {medusa['plain_step_ms']} ms, {best['speedup']}x; "
                    f"the card's 63-node tree at 2.07 tokens/step: {medusa['card_tree_speedup_at_2.07']}x"))
    else:
        out.append(("Medusa", "not run"))
    dmc = last_record(folder, "dmc_decode")
    if dmc:
        ok = [r for r in dmc["result"] if "error" not in r]
        if ok:
            big = max(ok, key=lambda r: (r["context"] * r["batch"], r["context"]))
            out.append((f"DMC ({dmc['model']}, {dmc['decisions']})",
                        f"KV {big['plain_kv_bytes_per_token']} -> {big['dmc_kv_bytes_per_token']} bytes/token "
                        f"({big['kv_compression']}x); at context {big['context']}, batch {big['batch']}: "
                        f"{big['plain_tok_s']} -> {big['dmc_tok_s']} tok/s ({big['speedup']}x); speed-ups "
                        + ", ".join(f"{r['context']}x{r['batch']}: {r['speedup']}" for r in ok)))
        errors = [f"{r['context']}x{r['batch']}: {r['error']}" for r in dmc["result"] if "error" in r]
        if errors:
            out.append(("DMC errors", "; ".join(errors)))
    else:
        out.append(("DMC", "not run"))
    peaks = {b: r["peak_vram_bytes"] for b in ("fp8_gemm", "decode_e2e", "medusa_decode_8b", "dmc_decode")
             if (r := last_record(folder, b)) and "peak_vram_bytes" in r}
    out.append(("peak VRAM", ", ".join(f"{b} {v / GIB:.1f} GiB" for b, v in peaks.items()) or "n/a"))
    return out


def summary(folder: Path) -> str:
    device = (folder / "device.txt").read_text().strip() if (folder / "device.txt").exists() else "device unknown"
    commit = next((r["commit"] for b in ("decode_e2e", "fp8_gemm", "medusa_decode_8b", "dmc_decode")
                   if (r := last_record(folder, b))), "?")
    lines = [f"# GPU run: {device.removeprefix('device: ')}, commit {commit}", "", "| step | status | seconds |",
             "|---|---|---|"]
    lines += [f"| {n} | {s} | {t} |" for n, s, t in steps(folder)]
    lines += ["", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in figures(folder)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="the results folder of bench/gpu_run.sh")
    print(summary(ap.parse_args().folder))


if __name__ == "__main__":
    main()
