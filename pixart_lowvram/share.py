"""Dividing what is left of a queue between the ranks of a several-GPU run. Pure functions of the pending work, so a
rerun divides what is left the same way, and testable without a process group.

Images are divided by cost, so that the ranks finish together: a denoising step costs in proportion to the pixels
it works on, and a decode about DECODE_STEPS steps of the same size. Texts are divided by count (every text is
padded to the model's token length, so each costs the same), each encoded by one rank only."""
from __future__ import annotations

import heapq
from dataclasses import dataclass

# What decoding an image costs, in denoising steps at its size: a 1024x1024 SD-VAE decode took ~0.13 s on the H100
# and a DiT step with guidance 38 ms (DESIGN.md), so ~3.4; the PNG is written on other threads meanwhile.
DECODE_STEPS = 3


@dataclass(frozen=True)
class Work:
    """One image still to make, as the division sees it."""

    key: str  # the image's key: ties between images of equal cost are broken in key order
    pixels: int  # width x height it is denoised and decoded at (after resolution binning)
    steps: int  # denoising steps still to run: 0 where its latents are already made

    @property
    def cost(self) -> int:
        return self.pixels * (self.steps + DECODE_STEPS)


def divide_images(work: list[Work], ranks: int) -> list[list[int]]:
    """Indices into `work` for each rank, each list in ascending order. Greedy longest-first: the costliest image
    goes to the rank with the least cost so far (the lowest rank among equals), and so on down; images of equal
    cost go in key order. Each rank's cost is then within one image's cost of every other's."""
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, not {ranks}")
    order = sorted(range(len(work)), key=lambda i: (-work[i].cost, work[i].key, i))
    loads = [(0, rank) for rank in range(ranks)]  # a heap of (cost so far, rank)
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for i in order:
        load, rank = heapq.heappop(loads)
        shares[rank].append(i)
        heapq.heappush(loads, (load + work[i].cost, rank))
    return [sorted(share) for share in shares]


def divide_texts(keys: list[str], ranks: int) -> list[list[str]]:
    """Text keys for each rank, dealt out in key order: counts differ by one at most."""
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, not {ranks}")
    ordered = sorted(set(keys))
    return [ordered[rank::ranks] for rank in range(ranks)]


def total_cost(work: list[Work], indices: list[int]) -> int:
    return sum(work[i].cost for i in indices)
