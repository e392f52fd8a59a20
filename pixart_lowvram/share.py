"""Dividing what is left of a queue between the ranks of a several-GPU run. Pure functions of the pending work, so a
rerun divides what is left the same way, and testable without a process group.

Images are divided by cost, so that the ranks finish together: a denoising step costs in proportion to the pixels
it works on, and a decode about DECODE_STEPS steps of the same size. Texts are divided by count (every text is
padded to the model's token length, so each costs the same), each encoded by one rank only. Image-to-image's init
images still to encode are divided by the pixels they are encoded at, each encoded by one rank only, whichever
rank's images need it: texts and init images are both encoded before the ranks wait for one another, so an init
image goes first to a rank with fewer texts."""
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
    return _longest_first([(w.key, w.cost) for w in work], [0] * ranks)


def divide_inits(inits: list[tuple[str, int]], texts: list[int]) -> list[list[int]]:
    """Indices into `inits` (each an init image's key and the pixels it is encoded at) for each rank, `texts[r]`
    being how many texts rank r encodes. Greedy longest-first as `divide_images`; among ranks of equal pixels so
    far, the one with the fewest texts first."""
    return _longest_first(inits, texts)


def _longest_first(work: list[tuple[str, int]], tiebreak: list[int]) -> list[list[int]]:
    """Indices into `work` ((key, cost) each) for each of len(tiebreak) ranks: the costliest to the rank with the
    least cost so far (among equals, the lowest tiebreak, then the lowest rank), and so on down, equal costs in key
    order."""
    if not tiebreak:
        raise ValueError("ranks must be at least 1, not 0")
    order = sorted(range(len(work)), key=lambda i: (-work[i][1], work[i][0], i))
    loads = [(0, t, rank) for rank, t in enumerate(tiebreak)]  # a heap of (cost so far, tiebreak, rank)
    heapq.heapify(loads)
    shares: list[list[int]] = [[] for _ in tiebreak]
    for i in order:
        load, t, rank = heapq.heappop(loads)
        shares[rank].append(i)
        heapq.heappush(loads, (load + work[i][1], t, rank))
    return [sorted(share) for share in shares]


def divide_texts(keys: list[str], ranks: int) -> list[list[str]]:
    """Text keys for each rank, dealt out in key order: counts differ by one at most."""
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, not {ranks}")
    ordered = sorted(set(keys))
    return [ordered[rank::ranks] for rank in range(ranks)]


def total_cost(work: list[Work], indices: list[int]) -> int:
    return sum(work[i].cost for i in indices)
