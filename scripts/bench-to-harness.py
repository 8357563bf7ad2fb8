#!/usr/bin/env python3
"""Convert `trialgate screen --format csv` output to the BENCH-LN harness format.

trialgate writes `patient,trial,status,...` with patient = `Patient/<id>` and status one of
eligible, potentially-eligible, ineligible. The harness (shared/bench/check_agree.py) wants
`patient_id,outcome`, one row per patient sorted by patient_id in byte order, outcome one of
eligible, ineligible, unknown (potentially-eligible -> unknown), `\\n` line ends.

Usage:
  python3 scripts/bench-to-harness.py /tmp/tg.csv > /tmp/tg-harness.csv
  trialgate screen ... --format csv | python3 scripts/bench-to-harness.py - --trial bench-ln -o out.csv
"""
import argparse
import csv
import io
import sys

OUTCOME = {"eligible": "eligible", "ineligible": "ineligible", "potentially-eligible": "unknown"}


def convert(rows, trial=None):
    out = {}
    trials = set()
    for row in rows:
        if trial is not None and row["trial"] != trial:
            continue
        trials.add(row["trial"])
        pid = row["patient"]
        if pid.startswith("Patient/"):
            pid = pid[len("Patient/"):]
        status = row["status"]
        if status not in OUTCOME:
            raise SystemExit(f"unexpected status {status!r} for patient {row['patient']}")
        if pid in out:
            raise SystemExit(f"patient {pid} appears twice (several trials in the input? use --trial)")
        out[pid] = OUTCOME[status]
    if len(trials) > 1:
        raise SystemExit(f"the input holds several trials ({', '.join(sorted(trials))}); choose one with --trial")
    return sorted(out.items(), key=lambda kv: kv[0].encode("utf-8"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help="trialgate CSV report, or - for standard input")
    ap.add_argument("--trial", help="keep only this trial id (needed when the report holds several)")
    ap.add_argument("-o", "--output", help="write here instead of standard output")
    a = ap.parse_args()
    text = sys.stdin.read() if a.input == "-" else open(a.input, encoding="utf-8", newline="").read()
    rows = csv.DictReader(io.StringIO(text, newline=""))
    result = convert(rows, a.trial)
    lines = ["patient_id,outcome"] + [f"{pid},{outcome}" for pid, outcome in result]
    data = "\n".join(lines) + "\n"
    if a.output:
        with open(a.output, "w", encoding="utf-8", newline="\n") as f:
            f.write(data)
    else:
        sys.stdout.write(data)


if __name__ == "__main__":
    main()
