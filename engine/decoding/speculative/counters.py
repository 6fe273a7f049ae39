"""Speculative decoding's figures, counted over the steps of a reply (or of a server's life), in
the terms vLLM and llama.cpp's server use: drafts (steps that verified drafted tokens), draft
tokens, accepted tokens (drafted tokens accepted), accepted per draft position, and the accepted
tokens each proposer drafted."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Counters:
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    tokens: int = 0  # every token produced, drafted or not
    drafted_per_position: list[int] = field(default_factory=list)  # drafts that reached position k + 1
    accepted_per_position: list[int] = field(default_factory=list)  # ... and had it accepted
    by_proposer: dict[str, int] = field(default_factory=dict)  # accepted tokens each proposer drafted

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
        for k in range(depth):
            if k == len(self.drafted_per_position):
                self.drafted_per_position.append(0)
                self.accepted_per_position.append(0)
            self.drafted_per_position[k] += 1
            self.accepted_per_position[k] += k < got
        for src in step.drafted_by[1:]:
            for name in src.split("+"):
                self.by_proposer[name] = self.by_proposer.get(name, 0) + 1

    def merge(self, other: "Counters") -> None:
        for name in ("drafts", "draft_tokens", "accepted_tokens", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.drafted_per_position, other.drafted_per_position),
                             (self.accepted_per_position, other.accepted_per_position)):
            mine.extend([0] * (len(theirs) - len(mine)))
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
