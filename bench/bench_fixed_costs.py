"""The quick start's fixed costs outside the models, old route against new, measured in one run on one imagefolder:
loading the split (datasets' own pattern search against `data.imagefolder_data_files`), fingerprinting every image
(row by row against table slices) and the FID's Tr(Σ_aΣ_b)^½ (scipy's sqrtm against the n × n eigenvalues).

    python -m dp_sapf.prepare_data --name fashion_mnist --output_dir runs/fashion_full
    python bench/bench_fixed_costs.py --data_dir runs/fashion_full   # -> bench/results/fixed_costs_cpu.json
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dp_sapf import data, metrics  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="An imagefolder with train/ (e.g. all 60,000 Fashion-MNIST images).")
    p.add_argument("--resolution", type=int, default=32, help="Fingerprint resolution (the quick start's 32).")
    p.add_argument("--fid_rows", type=int, nargs=2, default=[500, 300],
                   help="Rows of the two feature sets of the FID timing (the quick start: 500 real, 300 synthetic).")
    p.add_argument("--output_json", default="bench/results/fixed_costs_cpu.json", help="Where the figures go.")
    args = p.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    # warm datasets' arrow cache for both routes, so each timing below is a second call, as in every script but
    # the first
    datasets.load_dataset("imagefolder", data_dir=args.data_dir)
    datasets.load_dataset("imagefolder", data_dir=args.data_dir, data_files=data.imagefolder_data_files(args.data_dir))
    _, load_old = timed(lambda: datasets.load_dataset("imagefolder", data_dir=args.data_dir))
    loaded, load_new = timed(lambda: datasets.load_dataset(
        "imagefolder", data_dir=args.data_dir, data_files=data.imagefolder_data_files(args.data_dir)))
    labelled = data.LabelledImages(loaded["train"], "image", np.asarray(loaded["train"]["label"]), [])
    n = len(labelled)

    def keys_row_by_row():
        return torch.tensor([data.image_key(data.preprocess(labelled.image(i), args.resolution)) for i in range(n)])

    old_keys, keys_old = timed(keys_row_by_row)
    new_keys, keys_new = timed(lambda: data._image_keys(labelled, args.resolution, show_progress=False))
    assert torch.equal(old_keys, new_keys), "the two fingerprint routes disagree"

    rng = np.random.default_rng(0)
    a = rng.normal(size=(args.fid_rows[0], 2048)) @ rng.normal(size=(2048, 2048)) * 0.05
    b = rng.normal(size=(args.fid_rows[1], 2048)) * 0.8 + 0.1
    fid_old, sqrtm_s = timed(lambda: metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                                             np.cov(b, rowvar=False)))
    fid_new, eig_s = timed(lambda: metrics.fid_from_features(a, b))
    rows = [("load the train split (datasets' pattern search / one listing)", load_old, load_new),
            (f"fingerprint {n} images (row by row / table slices)", keys_old, keys_new),
            (f"FID of {args.fid_rows[0]} vs {args.fid_rows[1]} 2048-d rows (sqrtm / n × n eigenvalues)", sqrtm_s, eig_s)]
    result = {"date": str(datetime.date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "threads": torch.get_num_threads(), "images": n,
              "rows": [{"what": w, "old_s": o, "new_s": s, "old_over_new": o / s} for w, o, s in rows],
              "fid_old": fid_old, "fid_new": fid_new}
    os.makedirs(os.path.dirname(args.output_json) or ".", exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{result['date']}, {result['machine']}, {result['threads']} threads")
    print("| cost | old route (s) | new route (s) | old / new |\n|---|---|---|---|")
    for w, o, s in rows:
        print(f"| {w} | {o:.1f} | {s:.2f} | {o / s:.1f} |")
    print(f"FID {fid_old:.4f} (sqrtm) against {fid_new:.4f} (eigenvalues)")


if __name__ == "__main__":
    main()
