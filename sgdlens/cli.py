"""The ``sgdlens`` command line: ``sgdlens demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sgdlens", description="See where your optimizer is.")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train Shwartz-Ziv & Tishby's network on their 12-bit task and print per-layer SNR",
        description=(
            "Train the 12-10-7-5-4-3-2 tanh network on the 12-bit task (generated in code) and "
            "print the per-layer gradient SNR (one-epoch windows) as it trains."
        ),
    )
    demo.add_argument("--epochs", type=_positive_int, default=800)
    demo.add_argument("--batch-size", type=_positive_int, default=512)
    demo.add_argument("--lr", type=_positive_float, default=4e-4)
    demo.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--log-epochs", type=_positive_int, default=10, help="epochs per record")
    demo.add_argument("--print-every", type=_positive_int, default=4, help="records per line")
    demo.add_argument("--out", default="runs/demo.jsonl", help="JSONL file to append the run to")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "demo":
        from sgdlens import demo

        options = {k: v for k, v in vars(args).items() if k != "command"}
        return demo.main(**options)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
