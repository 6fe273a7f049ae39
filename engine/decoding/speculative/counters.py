"""Speculative decoding's figures, counted over the steps of a reply (or of a server's life), in
the terms vLLM and llama.cpp's server use: drafts (steps that verified drafted tokens), draft
tokens, accepted tokens (drafted tokens accepted), accepted per draft position, and the accepted
tokens each proposer drafted. ``vllm_request_metrics`` gives one reply's figures in the shape of vLLM's
per-request speculative metrics. A step's draft is a tree: its draft tokens are the tree's
nodes, its depth the longest path a step could accept."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class Counters:
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    tokens: int = 0  # every token produced, drafted or not
    drafted_per_position: list[int] = field(default_factory=list)  # drafts that reached position k + 1
    accepted_per_position: list[int] = field(default_factory=list)  # ... and had it accepted
    by_proposer: dict[str, int] = field(default_factory=dict)  # accepted tokens each proposer drafted
    accepted_histogram: list[int] = field(default_factory=list)  # drafts that had j tokens accepted, by j

    def add(self, step: list[int]) -> None:
        """One step's tokens (engine/decoding/base.py's ``Accepted`` where drafted)."""
        self.tokens += len(step)
        nodes, depth = getattr(step, "draft_nodes", 0), getattr(step, "draft_depth", 0)
        if not nodes:
            return
        self.drafts += 1
        self.draft_tokens += nodes
        got = len(step) - 1  # the first token of a step is the model's own
        self.accepted_tokens += got
        _grow(self.accepted_histogram, max(got, depth) + 1)
        self.accepted_histogram[got] += 1
        _grow(self.drafted_per_position, depth)
        _grow(self.accepted_per_position, depth)
        for k in range(depth):
            self.drafted_per_position[k] += 1
            self.accepted_per_position[k] += k < got
        for src in step.drafted_by[1:]:
            for name in src.split("+"):
                self.by_proposer[name] = self.by_proposer.get(name, 0) + 1

    def merge(self, other: "Counters") -> None:
        for name in ("drafts", "draft_tokens", "accepted_tokens", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.drafted_per_position, other.drafted_per_position),
                             (self.accepted_per_position, other.accepted_per_position),
                             (self.accepted_histogram, other.accepted_histogram)):
            _grow(mine, len(theirs))
            for k, v in enumerate(theirs):
                mine[k] += v
        for name, v in other.by_proposer.items():
            self.by_proposer[name] = self.by_proposer.get(name, 0) + v

    @property
    def draft_share(self) -> float:
        """The share of the tokens produced that were accepted drafts."""
        return self.accepted_tokens / self.tokens if self.tokens else 0.0

    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def to_dict(self) -> dict:
        return {**asdict(self), "draft_share": round(self.draft_share, 4),
                "acceptance_by_position": [round(a, 4) for a in self.acceptance_by_position()]}

    @classmethod
    def from_dict(cls, d: dict) -> "Counters":
        """The counters of ``to_dict``'s output (its derived figures are left out)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def vllm_request_metrics(self) -> dict:
        """``{"speculative_decoding": {...}}``, the ``metrics`` object vLLM's OpenAI server adds to a
        response (``--per-request-spec-decode-metrics summary``): steps that verified a draft, draft and
        accepted draft tokens, the mean tokens per such step, and the drafts by tokens accepted."""
        return {"speculative_decoding": {
            "mean_acceptance_length": 1 + self.accepted_tokens / self.drafts if self.drafts else 0.0,
            "draft_acceptance_rate": self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0,
            "acceptance_histogram": list(self.accepted_histogram),
            "num_spec_steps": self.drafts,
            "num_accepted_draft_tokens": self.accepted_tokens,
            "num_draft_tokens": self.draft_tokens,
            "num_spec_tokens": len(self.drafted_per_position)}}


def _grow(counts: list[int], n: int) -> None:
    counts.extend([0] * (n - len(counts)))
