#!/usr/bin/env python3
"""Read an mbridge TensorBoard directory with TensorBoard's own reader and check tags and steps.

Usage:
    python scripts/check_tensorboard.py <tensorboard_dir> --iters N [--interval K]
        [--tag TAG ...] [--validation-count V]

Checks that every training tag (default: lm loss, learning-rate, grad-norm, batch-size, and
their "vs samples" forms) has one scalar per logged iteration (K, 2K, ..., N), that every value
is finite, and, with --validation-count, that "lm loss validation" has V points. Prints a
summary of all tags and exits non-zero on the first mismatch. Needs `pip install tensorboard`;
the Rust test suite does not use this script.
"""
import argparse
import math
import sys

from tensorboard.backend.event_processing import event_accumulator

DEFAULT_TAGS = ["lm loss", "learning-rate", "grad-norm", "batch-size"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logdir")
    ap.add_argument("--iters", type=int, required=True, help="train_iters of the run")
    ap.add_argument("--interval", type=int, default=1, help="logger.tensorboard_log_interval")
    ap.add_argument("--tag", action="append", help="a training tag to check (repeatable)")
    ap.add_argument("--validation-count", type=int, help="expected 'lm loss validation' points")
    args = ap.parse_args()

    acc = event_accumulator.EventAccumulator(
        args.logdir, size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    tags = acc.Tags()["scalars"]
    print(f"{len(tags)} scalar tags in {args.logdir}:")
    for t in sorted(tags):
        ev = acc.Scalars(t)
        print(f"  {t!r}: {len(ev)} points, steps {ev[0].step}..{ev[-1].step}, last {ev[-1].value:.6g}")

    errors = []
    want_steps = list(range(args.interval, args.iters + 1, args.interval))
    for base in args.tag or DEFAULT_TAGS:
        for tag in (base, f"{base} vs samples"):
            if tag not in tags:
                errors.append(f"missing tag {tag!r}")
                continue
            ev = acc.Scalars(tag)
            if len(ev) != len(want_steps):
                errors.append(f"{tag!r}: {len(ev)} points, expected {len(want_steps)}")
            if tag == base and [e.step for e in ev] != want_steps:
                errors.append(f"{tag!r}: steps {[e.step for e in ev][:8]}..., expected {want_steps[:8]}...")
            if any(not math.isfinite(e.value) for e in ev):
                errors.append(f"{tag!r}: non-finite values")
    if args.validation_count is not None:
        n = len(acc.Scalars("lm loss validation")) if "lm loss validation" in tags else 0
        if n != args.validation_count:
            errors.append(f"'lm loss validation': {n} points, expected {args.validation_count}")
    for e in errors:
        print(f"FAIL: {e}", file=sys.stderr)
    if not errors:
        print("OK")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
