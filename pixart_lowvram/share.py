"""Dividing what is left of a queue between the ranks of a several-GPU run. Pure functions of the pending work, so a
rerun divides what is left the same way, and testable without a process group.

Images are divided by cost, so that the ranks finish together: a denoising step costs in proportion to the pixels
it works on, and a decode about DECODE_STEPS steps of the same size. Each rank's cost is within one image's cost of
an even share (the total over the ranks).

A rank loads the transformer once for each LoRA set among its images (denoise.py), and runs each batch group
(images of one size, steps, guidance, sampler and strength) in batches of its own. So the images to denoise are
laid end to end on a line of cost, set after set, and the line is cut into equal stretches, one a rank: a rank
works on the sets its stretch meets, so that S sets over N ranks take at most S + N - 1 transformer loads in all
(longest-first over all the images, regardless of sets, took up to S x N). A set that several stretches meet is
dealt out between those ranks costliest image first, each rank aiming at its stretch's part of the set, less what
it took beyond its parts of the sets before: an image goes to the rank that took the last image of its batch group
while it fits in what that rank still lacks, else to the rank that lacks the most (longest-first). The same deal is
also made without keeping batch groups together, and the one whose busiest rank has less is kept (the first, on a
tie): with one set (no LoRA) the second deal is longest-first itself, so such a queue is never divided less evenly
than longest-first divides it (where no image is decode only). Images whose latents are made already (decode only)
need no transformer: they are dealt last, costliest first, each to the rank with the least so far.

Texts are divided by count (every text is padded to the model's token length, so each costs the same), each
encoded by one rank only. Image-to-image's init images still to encode are divided by the pixels they are encoded
at, each encoded by one rank only, whichever rank's images need it: texts and init images are both encoded before
the ranks wait for one another, so an init image goes first to a rank with fewer texts."""
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
    lora: str = ""  # the LoRA set the transformer is loaded with for it: images of one set share a load
    group: str = ""  # its denoise batch group: images of one group share batches

    @property
    def cost(self) -> int:
        return self.pixels * (self.steps + DECODE_STEPS)


def divide_images(work: list[Work], ranks: int) -> list[list[int]]:
    """Indices into `work` for each rank, each list in ascending order (the module's docstring says how)."""
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, not {ranks}")
    sets: dict[str, list[int]] = {}
    decode_only = []
    for i, w in enumerate(work):
        if w.steps:
            sets.setdefault(w.lora, []).append(i)
        else:
            decode_only.append(i)
    deals = [_deal(work, sets, decode_only, ranks, keep_groups) for keep_groups in (True, False)]
    shares, _ = min(deals, key=lambda deal: max(deal[1]))
    return [sorted(share) for share in shares]


def _deal(work: list[Work], sets: dict[str, list[int]], decode_only: list[int], ranks: int,
          keep_groups: bool) -> tuple[list[list[int]], list[int]]:
    """One deal: each rank's indices and its cost. Costs count `ranks` times over, so that the stretches' ends, at
    multiples of the total, are whole numbers."""
    total = sum(work[i].cost for items in sets.values() for i in items) or 1
    shares: list[list[int]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    aimed = [0] * ranks  # the parts of the sets dealt so far that each rank's stretch meets
    start = 0
    for name in sorted(sets):
        items = sets[name]
        end = start + ranks * sum(work[i].cost for i in items)
        part = {r: min(end, (r + 1) * total) - max(start, r * total)
                for r in range(start // total, min(ranks, -(-end // total)))}
        part = {r: length for r, length in part.items() if length > 0} or {min(start // total, ranks - 1): 0}
        start = end
        lacks = {r: length + aimed[r] - load[r] for r, length in part.items()}
        for r, length in part.items():
            aimed[r] += length
        took: dict[str, int] = {}  # batch group -> the rank that took its last image
        for i in sorted(items, key=lambda i: (-work[i].cost, work[i].group, work[i].key, i)):
            cost = ranks * work[i].cost
            rank = took.get(work[i].group) if keep_groups else None
            if rank is None or lacks[rank] < cost:
                rank = max(lacks, key=lambda r: (lacks[r], -r))
            shares[rank].append(i)
            lacks[rank] -= cost
            load[rank] += cost
            took[work[i].group] = rank
    for i in sorted(decode_only, key=lambda i: (-work[i].cost, work[i].key, i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        shares[rank].append(i)
        load[rank] += ranks * work[i].cost
    return shares, load


def divide_inits(inits: list[tuple[str, int]], texts: list[int]) -> list[list[int]]:
    """Indices into `inits` (each an init image's key and the pixels it is encoded at) for each rank, `texts[r]`
    being how many texts rank r encodes, each list in ascending order. Greedy longest-first: the largest to the rank
    with the fewest pixels so far (among equals, the one with the fewest texts, then the lowest rank), and so on
    down, equal sizes in key order."""
    if not texts:
        raise ValueError("ranks must be at least 1, not 0")
    order = sorted(range(len(inits)), key=lambda i: (-inits[i][1], inits[i][0], i))
    loads = [(0, t, rank) for rank, t in enumerate(texts)]  # a heap of (pixels so far, texts, rank)
    heapq.heapify(loads)
    shares: list[list[int]] = [[] for _ in texts]
    for i in order:
        load, t, rank = heapq.heappop(loads)
        shares[rank].append(i)
        heapq.heappush(loads, (load + inits[i][1], t, rank))
    return [sorted(share) for share in shares]


def divide_texts(keys: list[str], ranks: int) -> list[list[str]]:
    """Text keys for each rank, dealt out in key order: counts differ by one at most."""
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, not {ranks}")
    ordered = sorted(set(keys))
    return [ordered[rank::ranks] for rank in range(ranks)]


def total_cost(work: list[Work], indices: list[int]) -> int:
    return sum(work[i].cost for i in indices)
