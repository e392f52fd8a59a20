"""What identifying a model by whole-file hashes costs: `models.file_sha256` over every weights file of a model
folder, first with an empty hash cache (the files read and hashed once; the page cache as the machine has it), then
again (from the cache: path, size, mtime and inode).

    python bench/hash_time.py MODEL_DIR [--out OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="pixart-hash-cache-")  # an empty cache, before import
    from pixart_lowvram.models import file_sha256  # noqa: PLC0415

    rows = []
    for component in sorted(p for p in args.model.iterdir() if p.is_dir()):
        files = sorted(component.glob("*.safetensors"))
        if not files:
            continue
        size = sum(f.stat().st_size for f in files)
        start = time.perf_counter()
        for f in files:
            file_sha256(f)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for f in files:
            file_sha256(f)
        again = time.perf_counter() - start
        rows.append({"component": component.name, "files": len(files), "gb": size / 1e9, "first_s": first,
                     "cached_s": again, "gb_per_s": size / 1e9 / first})
        print(f"{component.name}: {len(files)} file(s), {size / 1e9:.2f} GB: first {first:.2f} s "
              f"({size / 1e9 / first:.2f} GB/s), cached {again * 1000:.1f} ms", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hash_time.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
