"""Take the JSON object that a `tq-vllm eval ... --json` run printed (the last line of LOG that parses as a JSON
object: vLLM writes its own log lines to the same stream), add KEY=VALUE fields, append it as one line to OUT, and
print a short human summary of it (perplexity rows or NIAH counts) for summary.txt.

    python scripts/device/jsonl.py LOG OUT.jsonl [KEY=VALUE ...]
Exit code 1 if LOG holds no JSON object.
"""
from __future__ import annotations

import datetime
import json
import sys


def last_json(path: str):
    obj = None
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    pass
    return obj


def summary(rec: dict) -> list[str]:
    out = []
    if "results" in rec:  # eval ppl
        for r in rec["results"]:
            out.append(f"  ppl {r['preset']:<22} {r['ppl']:8.4f}  {r['delta_pct']:+7.2f} %  "
                       f"kv_cache_dtype={r.get('kv_cache_dtype', '?')} backend={r.get('attention_backend', '?')} "
                       f"({r.get('seconds', 0):.0f} s)")
    for run in rec.get("runs", []):  # eval niah
        by_ctx: dict[int, list[bool]] = {}
        for r in run["results"]:
            by_ctx.setdefault(r["context"], []).append(bool(r["found"]))
        cells = ", ".join(f"{c}: {sum(v)}/{len(v)}" for c, v in sorted(by_ctx.items()))
        out.append(f"  niah {run['preset']:<10} {run['found']}/{run['total']} found ({cells}); "
                   f"{run.get('seconds', 0):.0f} s")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    log, out, extra = argv[0], argv[1], argv[2:]
    rec = last_json(log)
    if rec is None:
        print(f"  (no JSON result in {log})")
        return 1
    for kv in extra:
        k, _, v = kv.partition("=")
        rec[k] = v
    rec.setdefault("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    with open(out, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    print("\n".join(summary(rec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
