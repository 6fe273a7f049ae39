"""An n-gram index of the conversation: where each run of ``n`` tokens (``n`` = MIN_N..MAX_N)
ended before, so that the text that followed it there can be drafted when the reply arrives at
the same run again (prompt lookup). It grows with the chat: a new reply's prompt extends the last
one's tokens, and only the new tokens are indexed; each token costs one insert per ``n``."""

from __future__ import annotations

MIN_N, MAX_N = 2, 4  # one matching token drafts too often by chance
SCAN = 4  # occurrences looked at per continuation wanted (a common n-gram recurs hundreds of times)


class NgramIndex:
    def __init__(self, min_n: int = MIN_N, max_n: int = MAX_N):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._ends: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in range(min_n, max_n + 1)}

    def sync(self, tokens: list[int]) -> None:
        """Index ``tokens`` (the conversation so far): only what follows the part already indexed,
        or afresh where the conversation is not a continuation of it (another chat, an edit)."""
        n = len(self.tokens)
        if len(tokens) < n or tokens[:n] != self.tokens:
            self.tokens, self._ends = [], {k: {} for k in self._ends}
            n = 0
        self.extend(tokens[n:])

    def extend(self, new: list[int]) -> None:
        toks = self.tokens
        for t in new:
            toks.append(t)
            end = len(toks) - 1
            for n, ends in self._ends.items():
                if end + 1 >= n:
                    ends.setdefault(tuple(toks[end + 1 - n:]), []).append(end)

    def continuations(self, tail: list[int], length: int, most: int) -> tuple[int, list[list[int]]]:
        """The longest n-gram ending ``tail`` (the last tokens, up to the one about to be added)
        that occurred before -> (n, up to ``most`` distinct continuations of up to ``length``
        tokens that followed it, the most recent occurrence first); (0, []) when none did."""
        for n in range(min(self.max_n, len(tail)), self.min_n - 1, -1):
            ends = self._ends[n].get(tuple(tail[-n:]))
            if not ends:
                continue
            found: list[list[int]] = []
            for end in reversed(ends[-SCAN * most:]):
                cont = self.tokens[end + 1:end + 1 + length]
                if cont and cont not in found:
                    found.append(cont)
                    if len(found) == most:
                        break
            if found:
                return n, found
        return 0, []
