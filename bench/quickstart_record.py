"""The committed record of one quick-start run (results/quickstart/quickstart_<name>.json), which the README quotes
verbatim (tests/test_compare.py checks it): the lines the run printed, its numbers, its mask, and optionally the same
LoRA scored by the comparison's protocol.

    bash bench/bench_quickstart.sh > qs.log 2>&1        # runs/bench-quickstart
    python bench/quickstart_record.py --run_dir runs/bench-quickstart --log qs.log --name 2026-12-07_half_compute \
        --what "..." [--protocol_metrics runs/bench-quickstart/eval_protocol/metrics.json --protocol_commands ...]
"""

import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def printed_lines(log_path: str) -> list[str]:
    """The quick start's closing lines: from "epsilon = " to "wall time" (progress bars' carriage returns dropped)."""
    lines = [line.split("\r")[-1].rstrip() for line in open(log_path, encoding="utf-8", errors="replace")]
    start = max(i for i, line in enumerate(lines) if line.startswith("epsilon = "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("wall time "))
    return lines[start:end + 1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, help="The quick start's run folder (RUN_DIR of scripts/quickstart.sh).")
    p.add_argument("--log", required=True, help="Its console output.")
    p.add_argument("--name", required=True, help="The record is results/quickstart/quickstart_<name>.json.")
    p.add_argument("--what", required=True, help="One sentence: which run, which settings.")
    p.add_argument("--protocol_metrics", default=None,
                   help="evaluate.py's metrics.json of the same LoRA scored by the comparison's protocol.")
    p.add_argument("--protocol_commands", nargs="*", default=[], help="The commands that produced --protocol_metrics.")
    p.add_argument("--protocol", default="the same LoRA, 1,000 samples (25 PNDM steps, guidance 3, seed 0), WRN-10-1 "
                   "20 epochs, the 10,000 real test images (experiments/compare.py --scale cpu_r2's evaluation; its "
                   "public-model row: 0.209)", help="How --protocol_metrics was measured.")
    args = p.parse_args(argv)
    run = args.run_dir
    report = json.load(open(f"{run}/lora/privacy_report.json"))
    dp, base = json.load(open(f"{run}/eval/metrics.json")), json.load(open(f"{run}/eval_baseline/metrics.json"))
    mask = json.load(open(f"{run}/mask.json"))
    lines = printed_lines(args.log)
    record = {
        "what": args.what,
        "printed": lines,
        "quickstart": {
            "epsilon": report["epsilon"], "delta": report["delta"],
            "epsilon_selection_only": report["budget_split"]["epsilon_selection_only"],
            "expected_batch_size": report["expected_batch_size"], "steps": report["steps"],
            "noise_multiplier": report["noise_multiplier"], "clipping": report["clipping"],
            "selection_sample_rate": report["selection_sample_rate"], "scorer": mask["scorer"],
            "accuracy_wrn": dp["accuracy_wrn"], "fid_train": dp["fid_train"],
            "public_model_alone_accuracy_wrn": base["accuracy_wrn"], "public_model_alone_fid_train": base["fid_train"],
            "real_reference_accuracy_wrn": dp.get("real_reference_accuracy_wrn"),
            "protocol": "300 samples (20 PNDM steps, guidance 3), WRN-10-1 10 epochs, 500 real test images; FID "
                        "against 500 real train images",
            "wall_s": json.load(open(f"{run}/timings.json")),
        },
        "mask": {"selected_matrices": mask["target_modules"]},
    }
    if args.protocol_metrics:
        metrics = json.load(open(args.protocol_metrics))
        record["comparison_protocol"] = {"accuracy_wrn": metrics["accuracy_wrn"], "protocol": args.protocol,
                                         "commands": args.protocol_commands}
    if not re.fullmatch(r"[\w.-]+", args.name):
        sys.exit(f"error: --name {args.name!r}: letters, digits, '.', '_' and '-' only")
    path = os.path.join(REPO, "results", "quickstart", f"quickstart_{args.name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
