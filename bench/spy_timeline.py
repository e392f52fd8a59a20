"""Where a process's wall time goes, from a py-spy recording (speedscope format) of its main thread.

    py-spy record -r 100 -f speedscope -o run.json -- python -m pixart_lowvram.cli run ...
    python bench/spy_timeline.py run.json [--top 12]

Prints the main thread's time per phase (the innermost of our functions or imports on its stack), the phases
in the order they first ran, and for each the functions that held it longest (their own frames or the
innermost of ours). Sampling, unlike cProfile, does not slow the Python it watches."""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

# Functions that name a phase: a sample belongs to the innermost of these on its stack.
PHASES = ["main", "run_queue", "resolve", "resolve_model", "check_jobs", "_Run.start_device", "_Run.prepare",
          "_Run.pending_images", "_Run.pending_latents", "_Run.pending_texts", "plan_run",
          "_Run.write_manifest", "encode_texts", "denoise_items", "decode_items", "release",
          "load_text_encoder_streamed", "load_text_encoder", "load_transformer", "load_transformer_streamed",
          "load_vae", "make_pipeline", "PixArtAlphaPipeline.encode_prompt", "PixArtAlphaPipeline.__call__",
          "StripDecoder.decode", "from_pretrained", "DiffusionPipeline.from_pretrained"]
IMPORT = "_find_and_load"


def phase_of(stack: list[str]) -> str:
    """stack: frame names, outermost first."""
    phase = "(start-up)"
    importing = False
    for name in stack:
        if name in PHASES or name.split(".")[-1] in PHASES:
            phase, importing = name, False
        elif name == IMPORT:
            importing = True
    return f"import (in {phase})" if importing else phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recording")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--thread", default=None, help="thread name to read (default: the one sampled most)")
    args = ap.parse_args()
    data = json.load(open(args.recording))
    frames = data["shared"]["frames"]
    profiles = data["profiles"]
    prof = (next(p for p in profiles if args.thread in p["name"]) if args.thread
            else max(profiles, key=lambda p: sum(p["weights"])))
    total = sum(prof["weights"])
    per_phase: dict[str, float] = Counter()
    first: dict[str, int] = {}
    leaves: dict[str, Counter] = defaultdict(Counter)
    for i, (sample, weight) in enumerate(zip(prof["samples"], prof["weights"])):
        stack = [frames[f]["name"] for f in sample]
        phase = phase_of(stack)
        per_phase[phase] += weight
        first.setdefault(phase, i)
        leaf = stack[-1] if stack else "?"
        where = frames[sample[-1]]["file"].rsplit("/", 2)[-2:] if sample else []
        leaves[phase][f"{leaf} ({'/'.join(where)})"] += weight
    print(f"{prof['name']}: {total:.2f} s sampled")
    for phase in sorted(per_phase, key=first.get):
        print(f"{per_phase[phase]:7.2f} s  {phase}")
        for leaf, w in leaves[phase].most_common(args.top):
            if w >= 0.05:
                print(f"           {w:6.2f} s  {leaf}")


if __name__ == "__main__":
    main()
