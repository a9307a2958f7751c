"""The `tq-vllm` command line (console script). Minimal for now; the lead extends it."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tq-vllm", description="TurboQuant-compressed KV cache for vLLM")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    pr = sub.add_parser("presets", help="list the KV cache presets: bits, bytes per token per head, compression")
    pr.add_argument("--block-size", type=int, default=32, help="tokens per vLLM block (default 32)")
    pr.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head sizes to show")
    pr.add_argument("--layout", metavar="PRESET", help="print the byte layout of one preset's page instead")
    pr.add_argument("--head-dim", type=int, default=128, help="head size for --layout")
    args = parser.parse_args(argv)

    if args.command == "presets":
        from tq_vllm.quant.presets import print_presets_table

        try:
            if args.layout:
                from tq_vllm.quant.layout import PageLayout

                print(PageLayout(args.layout, args.head_dim, args.block_size).describe())
            else:
                print_presets_table(head_dims=tuple(args.head_dims), block_size=args.block_size)
        except ValueError as e:
            print(f"tq-vllm presets: {e}", file=sys.stderr)
            return 2
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
