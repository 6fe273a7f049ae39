"""Random weights at a model's shape, read as a checkpoint would be (what vLLM calls the dummy
load format): the benchmarks at the Llama-3.1-8B and Llama-2-7B shapes and the CUDA tests run
the real loader and engine on them without downloading a checkpoint."""

from __future__ import annotations

import torch


class RandomSource:
    """Stands in for a checkpoint: random tensors (std 0.02; norms all ones) of whatever shape
    the loader asks for, seeded by ``seed`` when given."""

    def __init__(self, device, seed: int | None = None):
        self.device = device
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def __contains__(self, name):
        return True

    def names(self) -> set[str]:  # whatever is asked for exists; nothing else does
        return set()

    def get_shaped(self, name, shape):
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=self.device, dtype=torch.bfloat16)
        return torch.randn(shape, device=self.device, generator=self.generator).to(torch.bfloat16) * 0.02

    def file_of(self, name):
        return "random"

    def claim(self, names) -> None:  # nothing is left unread: there is nothing
        pass

    def unread(self) -> list[str]:
        return []
