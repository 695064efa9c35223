"""Template import against `tar -x` of the same layers, same run.

    python bench/bench_templates.py [--mib 100] [--runs 3] [--markdown]

Builds an OCI archive of about --mib MiB uncompressed in 3 gzip layers (a few large files, many small
ones, as an image has: 1/3 random bytes, the rest compressible text), then times:
- `stockade template import` (the Python path: reading the archive, verifying every blob digest and
  diff_id, checking and extracting every entry by descriptor, the os.sync() before a layer is renamed
  into place), into a fresh store each run;
- the baseline: `tar -xzf` of the same 3 gzip layer blobs into 3 fresh directories (no checks, no
  digests, no sync), and the same followed by `sync`.
The target (issue 12) is import within 2x of `tar -x`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from table import print_table  # noqa: E402
from tests.template_images import entry, layer, oci_layout, tar_dir  # noqa: E402

from stockade.templates import TemplateStore, import_image  # noqa: E402


def build(root: Path, mib: int) -> tuple[Path, list[Path]]:
    rng = random.Random(12)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(2000)]
    per_layer = mib * (1 << 20) // 3
    layers = []
    for n in range(3):
        entries = [entry("dir", f"l{n}"), entry("dir", f"l{n}/lib")]
        left = per_layer
        big = per_layer // 2
        entries.append(entry("file", f"l{n}/lib/blob.bin", rng.randbytes(big // 2) + b" ".join(
            rng.choices(words, k=big // 12))[: big // 2]))
        left -= big
        i = 0
        while left > 0:
            size = min(left, rng.choice((512, 2048, 8192, 32768)))
            if i % 100 == 0:
                entries.append(entry("dir", f"l{n}/share/d{i // 100}"))
            entries.append(entry("file", f"l{n}/share/d{i // 100}/f{i}",
                                 b" ".join(rng.choices(words, k=size // 5))[:size]))
            left -= size
            i += 1
        layers.append(layer(*entries))
    oci_layout(root / "layout", layers, compress="gzip")
    tar_dir(root / "layout", root / "image.tar")
    blobs = [p for p in (root / "layout" / "blobs" / "sha256").iterdir() if p.read_bytes()[:2] == b"\x1f\x8b"]
    return root / "image.tar", blobs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stockade-bench-tpl-"))
    try:
        archive, blobs = build(work, args.mib)
        imp, tar, tar_sync = [], [], []
        for run in range(args.runs):
            dest = work / f"tar{run}"
            t0 = time.perf_counter()
            for i, blob in enumerate(blobs):
                (dest / str(i)).mkdir(parents=True)
                subprocess.run(["tar", "-xzf", str(blob), "-C", str(dest / str(i))], check=True)
            tar.append(time.perf_counter() - t0)
            tar_sync.append(tar[-1] + _timed(os.sync))
            shutil.rmtree(dest)
            store = TemplateStore(work / f"store{run}")
            os.sync()
            t0 = time.perf_counter()
            template = import_image(store, "bench", f"oci-archive:{archive}")
            imp.append(time.perf_counter() - t0)
            shutil.rmtree(work / f"store{run}")
        size = template.size
        med = statistics.median
        rows = [(f"tar -xzf of the 3 layers ({size / (1 << 20):.0f} MiB of files)", f"{med(tar) * 1000:.0f} ms",
                 "1.00x"),
                ("tar -xzf, then sync", f"{med(tar_sync) * 1000:.0f} ms", f"{med(tar_sync) / med(tar):.2f}x"),
                ("stockade template import oci-archive:", f"{med(imp) * 1000:.0f} ms", f"{med(imp) / med(tar):.2f}x")]
        print_table([f"measure (median of {args.runs} runs)", "time", "vs tar -x"], rows, args.markdown)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
