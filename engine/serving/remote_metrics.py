"""What a remote server says about its own decoding, from its Prometheus ``/metrics`` page:
vLLM's speculative-decoding counters (tokens accepted per step over one request, from the
counters' change around it), vLLM's KV-cache usage, and ``chatapp serve``'s own Medusa and DMC
gauges. A server without the page, or without these metrics, simply yields none of them."""

from __future__ import annotations

import math

ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
DRAFTS = "vllm:spec_decode_num_drafts_total"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # a fraction, 0..1
OURS_ACCEPTED = "chatapp_medusa_accepted_tokens_per_step"
OURS_COMPRESSION = "chatapp_last_kv_compression_ratio"


def parse(text: str) -> dict[str, float]:
    """Prometheus text format -> {metric name: value summed over its label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            rest = rest[rest.rfind("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value):
            out[name.strip()] = out.get(name.strip(), 0.0) + value
    return out


def metrics_url(base_url: str) -> str:
    """The server's /metrics next to its OpenAI API base (…/v1)."""
    base = base_url.rstrip("/")
    return (base[:-3] if base.endswith("/v1") else base) + "/metrics"


def scrape(url: str, timeout: float = 2.0) -> dict[str, float] | None:
    """The parsed page, or None when the server has none (any failure: the figures are extras)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - the user's own server URL
            return parse(r.read(4 << 20).decode("utf-8", "replace"))
    except Exception:  # noqa: BLE001 - no metrics is a normal answer
        return None


def summarize(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """The figures for one request, from the pages read before and after it."""
    if not after:
        return {}
    out: dict[str, float] = {}
    if before and ACCEPTED in after and DRAFTS in after:
        drafts = after[DRAFTS] - before.get(DRAFTS, 0.0)
        if drafts > 0:  # each draft step also yields the target model's own token
            out["accepted_per_step"] = 1.0 + (after[ACCEPTED] - before.get(ACCEPTED, 0.0)) / drafts
    if "accepted_per_step" not in out and after.get(OURS_ACCEPTED, 0.0) > 0:
        out["accepted_per_step"] = after[OURS_ACCEPTED]
    for name in KV_USAGE:
        if name in after:
            out["kv_cache_usage"] = after[name]
            break
    if after.get(OURS_COMPRESSION, 0.0) > 1.0:
        out["kv_compression"] = after[OURS_COMPRESSION]
    return out
