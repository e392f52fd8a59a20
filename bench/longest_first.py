"""The `pixart-lowvram` command with the work divided as before LoRA sets and batch groups counted (issue 15's
division: the costliest image to the rank with the least so far, by cost alone), for bench/multigpu.py
`--compare-longest-first` to set against share.py's. Only rank 0 divides (generate.divide), in this
process; the workers it starts import this file under another name and change nothing.

    python bench/longest_first.py run QUEUE --gpus 0,1 ...      # the arguments of `pixart-lowvram`
"""
from __future__ import annotations

import heapq
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def longest_first(work, ranks: int) -> list[list[int]]:
    order = sorted(range(len(work)), key=lambda i: (-work[i].cost, work[i].key, i))
    loads = [(0, rank) for rank in range(ranks)]
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for i in order:
        load, rank = heapq.heappop(loads)
        shares[rank].append(i)
        heapq.heappush(loads, (load + work[i].cost, rank))
    return [sorted(share) for share in shares]


if __name__ == "__main__":
    from pixart_lowvram import cli, generate

    generate.divide_images = longest_first  # a bench's A/B: the library's own division is share.divide_images
    cli.exit_now(cli.main(sys.argv[1:]))
