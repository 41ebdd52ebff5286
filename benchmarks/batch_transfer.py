"""How fast a Batch of images moves through Ray's object store, against a per-row baseline.

    .venv/bin/python benchmarks/batch_transfer.py [--rows 256] [--size 512] [--repeats 5]

(a) Batch: one Arrow table; its pixel buffer travels out of band, so put is one memcpy into
    the store and get maps it back with no per-row Python objects.
(b) baseline: the same rows as a list of dicts holding numpy arrays (what a naive trainer
    ships), pickled row by row.
Prints ns per row and MB/s for put, get, and get+decode (a view of every image), and the ratios.
"""

import argparse
import time

import numpy as np

import tir  # noqa: F401
from tir.protocol import Batch


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=4 << 30, log_to_driver=False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.rows)]
    rows = [{"image": im, "tokens": list(range(64)), "reward": float(i)} for i, im in enumerate(images)]
    batch = Batch.from_rows(rows)
    megabytes = sum(im.nbytes for im in images) / 1e6

    def decode_batch(b):
        return sum(im.shape[0] for im in b.column("image"))

    def decode_rows(r):
        return sum(row["image"].shape[0] for row in r)

    for payload in (batch, rows):  # warm up: the store's first touch of its pages is slow
        ray.get(ray.put(payload))
    results = {}
    for name, payload, decode in (("rows", rows, decode_rows), ("batch", batch, decode_batch)):
        put_s, ref = timed(lambda payload=payload: ray.put(payload), args.repeats)
        get_s, _ = timed(lambda ref=ref: ray.get(ref), args.repeats)
        getdec_s, _ = timed(lambda ref=ref, decode=decode: decode(ray.get(ref)), args.repeats)
        results[name] = (put_s, get_s, getdec_s)

    print(f"{args.rows} rows x {args.size}x{args.size}x3 uint8 = {megabytes:.0f} MB, best of {args.repeats}\n")
    print("| payload | put ns/row | put MB/s | get ns/row | get MB/s | get+decode ns/row |")
    print("|---|---|---|---|---|---|")
    for name, (put_s, get_s, getdec_s) in results.items():
        print(
            f"| {name} | {put_s / args.rows * 1e9:,.0f} | {megabytes / put_s:,.0f} | {get_s / args.rows * 1e9:,.0f} | "
            f"{megabytes / get_s:,.0f} | {getdec_s / args.rows * 1e9:,.0f} |"
        )
    (bp, bg, bd), (rp, rg, rd) = results["batch"], results["rows"]
    print(
        f"\nratios rows/batch (higher = Batch faster): put {rp / bp:.2f}x, get {rg / bg:.2f}x, get+decode {rd / bd:.2f}x"
    )
    chunk_s, _ = timed(lambda: [ray.put(p) for p in batch.chunk(4)], args.repeats)
    print(f"put of batch.chunk(4) (one piece per rank): {megabytes / chunk_s:,.0f} MB/s (slices compacted, no overlap)")
    ray.shutdown()


if __name__ == "__main__":
    main()
