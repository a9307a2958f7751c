"""The `tq-vllm` command line (console script).

    tq-vllm presets [--layout PRESET]            the KV cache presets: bits, bytes per token per KV head
    tq-vllm check RECIPE.yaml [...]              validate a `vllm serve --config` recipe against a model
    tq-vllm store ls|stats|verify [PATH|RECIPE]  inspect / verify the connector's disk tier (and Redis)
    tq-vllm eval ppl|niah|formats ...            quality (tq_vllm.eval)
    tq-vllm bench [NAME [ARGS...]]               run benchmarks/bench_NAME.py with ARGS passed through

Every command imports what it needs only when it runs, so `tq-vllm presets` stays fast. Usage errors exit with
code 2 and say what is wrong and how to fix it.
"""
from __future__ import annotations

import argparse
import sys

BENCHES = ("decode", "store", "e2e", "connector", "quality")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tq-vllm", description="TurboQuant-compressed KV cache for vLLM",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `tq-vllm COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    pr = sub.add_parser("presets", help="list the KV cache presets: bits, bytes per token per head, compression")
    pr.add_argument("--block-size", type=int, default=32, help="tokens per vLLM block (default 32)")
    pr.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head sizes to show")
    pr.add_argument("--layout", metavar="PRESET", help="print the byte layout of one preset's page instead")
    pr.add_argument("--head-dim", type=int, default=128, help="head size for --layout")

    from tq_vllm.check import add_check_subcommand
    add_check_subcommand(sub)

    add_store_subcommand(sub)

    from tq_vllm.eval.cli import add_eval_subcommands; add_eval_subcommands(sub)  # noqa: E702  (quality: tq-vllm eval)

    sub.add_parser("bench", help="run a benchmark script (benchmarks/bench_NAME.py), arguments passed through",
                   description="tq-vllm bench NAME [ARGS...]: runs benchmarks/bench_NAME.py ARGS... with this Python "
                               f"(NAME: {', '.join(BENCHES)}); `tq-vllm bench` lists them. `tq-vllm bench NAME "
                               "--help` shows the script's own options.", add_help=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after NAME belongs to the script, --help included
        return cmd_bench(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval": return args.func(args)  # noqa: E701
    if args.command in ("check", "store"):
        return args.func(args)

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


# ------------------------------------------------------------------------------------------------ docs tables
def presets_markdown(head_dims=(64, 128), block_size: int = 32) -> str:
    """The preset table of docs/presets.md, from the code (tests/test_cli_docs.py keeps the doc equal to it)."""
    from tq_vllm.quant.layout import PageLayout
    from tq_vllm.quant.presets import PRESETS

    hdr = ["preset", "K bits", "V bits", "keys", "block mean"]
    hdr += [f"bytes/token/KV head, d={d}" for d in head_dims] + [f"vs bf16, d={d}" for d in head_dims]
    hdr += ["quality", "speed", "description"]
    rows = []
    for p in PRESETS.values():
        lays = [PageLayout(p, d, block_size) for d in head_dims]
        keys = "3-bit codes + 1-bit QJL" if p.k_mode == "prod" else "Lloyd–Max codes"
        mean = ", ".join(x for x, on in (("K", p.k_center), ("V", p.v_center)) if on) or "–"
        rows.append([f"`{p.name}`", str(p.k_bits), str(p.v_bits), keys, mean]
                    + [str(lay.bytes_per_token) for lay in lays]
                    + [f"{lay.compression_vs_bf16():.2f}×" for lay in lays]
                    + ["[quality.md](quality.md)", "[benchmarks.md](benchmarks.md)", p.description])
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


CAPACITY_CASES = (("tq4", {}), ("tq35", {}), ("tq3", {}), ("tq3", {"boundary_layers": 2, "boundary_preset": "tq8"}),
                  ("tq25", {}), ("tq8", {}))


def capacity_markdown(model_json: str, gpu_memory_gib: float = 79.1, max_model_len: int = 32768,
                      max_num_seqs: int = 64, utilization: float = 0.9) -> str:
    """Whole-model KV capacity per preset for one model config (docs/presets.md), from `tq_vllm.check`."""
    import json
    from pathlib import Path

    from tq_vllm.check import estimate_capacity, model_shape
    from tq_vllm.config import TQConfig

    shape = model_shape(json.loads(Path(model_json).read_text()))
    lines = ["| KV format | bytes/token (all layers) | KV tokens | × bf16 | full-context sequences |",
             "|---|---|---|---|---|"]
    bf16 = None
    for name, extra in CAPACITY_CASES:
        tq = TQConfig.from_dict({"preset": name, **extra})
        cap = estimate_capacity(shape, tq, block_size=32, max_num_seqs=max_num_seqs, gpu_memory_gib=gpu_memory_gib,
                                gpu_memory_utilization=utilization, max_model_len=max_model_len)
        if bf16 is None:
            bf16 = cap
            lines.append(f"| bf16 (vLLM default) | {cap.bf16_kv_bytes_per_token:,} | {cap.bf16_kv_tokens:,} | 1.00× | "
                         f"{cap.bf16_full_context_sequences} |")
        label = f"`{name}`" + (f" + first/last {extra['boundary_layers']} layers `{extra['boundary_preset']}`"
                               if extra else "")
        lines.append(f"| {label} | {cap.kv_bytes_per_token:,} | {cap.kv_tokens:,} | {cap.capacity_gain:.2f}× | "
                     f"{cap.full_context_sequences} |")
    return "\n".join(lines)


def recipes_markdown(recipes_dir: str = "recipes") -> str:
    """The recipe table of docs/recipes.md: settings from each YAML, capacity from its checked expect block."""
    from pathlib import Path

    from tq_vllm.check import load_recipe, read_expectations

    lines = ["| recipe | model | KV format | context | max seqs | memory | KV tokens (bf16) | × bf16 | "
             "full-context seqs (bf16) | connector |", "|" + "---|" * 10]
    for r in sorted(Path(recipes_dir).glob("*.yaml")):
        raw, exp = load_recipe(r), read_expectations(r)
        tq = (raw.get("additional-config") or {}).get("tq_vllm") or {}
        fmt = f"`{tq.get('preset', 'tq4')}`"
        if tq.get("boundary_layers"):
            fmt += f" + {tq['boundary_layers']}+{tq['boundary_layers']} `{tq.get('boundary_preset', 'tq8')}`"
        mem = (f"{exp['gpu_memory_gib']:g} GiB GPU × {raw.get('gpu-memory-utilization', 0.9):g}"
               if "gpu_memory_gib" in exp else f"{exp.get('kv_cache_gib', '?'):g} GiB CPU KV")
        kvt = raw.get("kv-transfer-config") or {}
        extra = kvt.get("kv_connector_extra_config") or {}
        tiers = ", ".join(t for t, k in (("CPU", "cpu_bytes"), ("disk", "disk_dir"), ("Redis", "redis_url"))
                          if k in extra or (t == "CPU" and kvt)) or "–"
        lines.append(f"| [{r.name}](../recipes/{r.name}) | {raw.get('model')} | {fmt} | {raw.get('max-model-len'):,} | "
                     f"{raw.get('max-num-seqs')} | {mem} | {exp['kv_tokens']:,} ({exp['bf16_kv_tokens']:,}) | "
                     f"{exp['capacity_gain']:.2f}× | {exp['full_context_sequences']} "
                     f"({exp['bf16_full_context_sequences']}) | {tiers} |")
    return "\n".join(lines)


def regenerate_docs(root: str = ".") -> list[str]:
    """Rewrite the generated blocks of docs/presets.md and docs/recipes.md from the code and recipes (run after a
    format change, after `tq-vllm check --update-expect recipes/*.yaml`). Returns the blocks that changed."""
    import re
    from pathlib import Path

    r = Path(root)
    gens = {("presets.md", "presets-table"): lambda: presets_markdown(),
            ("presets.md", "capacity-llama"):
                lambda: capacity_markdown(str(r / "recipes/models/Llama-3.1-8B-Instruct.json")),
            ("presets.md", "capacity-qwen"): lambda: capacity_markdown(str(r / "recipes/models/Qwen3-8B.json")),
            ("recipes.md", "recipes-table"): lambda: recipes_markdown(str(r / "recipes"))}
    changed = []
    for (doc, name), gen in gens.items():
        path = r / "docs" / doc
        text = path.read_text()
        pat = re.compile(rf"(<!-- generated: {re.escape(name)} .*?-->\n)(.*?)(\n<!-- end: {re.escape(name)} -->)", re.S)
        new = pat.sub(lambda m: m.group(1) + gen() + m.group(3), text)
        if new != text:
            path.write_text(new)
            changed.append(f"{doc}:{name}")
    return changed


# ------------------------------------------------------------------------------------------------ bench
def benchmarks_dir():
    """benchmarks/ of the source tree this package runs from ($TQ_VLLM_BENCHMARKS overrides)."""
    import os
    from pathlib import Path

    env = os.environ.get("TQ_VLLM_BENCHMARKS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_summary(path) -> str:
    import ast
    try:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    except (OSError, SyntaxError):
        doc = ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def cmd_bench(argv: list[str]) -> int:
    import os
    import subprocess

    d = benchmarks_dir()
    if not d.is_dir():
        print(f"tq-vllm bench: no benchmarks directory at {d}: the benchmarks ship with the source tree, not the "
              f"wheel; run from a checkout of tq_vllm (pip install -e .) or set TQ_VLLM_BENCHMARKS=DIR",
              file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help", "--list", "list"):
        print("usage: tq-vllm bench NAME [ARGS...]   (ARGS go to the script; `tq-vllm bench NAME --help` for its "
              "options)\n\nbenchmarks in " + str(d) + ":")
        for name in BENCHES:
            p = d / f"bench_{name}.py"
            state = _bench_summary(p) if p.is_file() else "(not written yet)"
            print(f"  {name:<10} {state}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    script = d / f"bench_{name}.py"
    if not script.is_file():
        have = sorted(p.stem[len("bench_"):] for p in d.glob("bench_*.py"))
        print(f"tq-vllm bench: unknown benchmark {name!r} (no {script}); available: {', '.join(have) or 'none'}",
              file=sys.stderr)
        return 2
    env = dict(os.environ)
    root = str(d.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        return subprocess.call([sys.executable, str(script), *rest], env=env)
    except KeyboardInterrupt:
        return 130


# ------------------------------------------------------------------------------------------------ store
STORE_DOC = """Inspect the TQConnector's stored blocks: the disk tier (segment files under
DISK_DIR/<format namespace>/dp<N>/seg-<id>.<rank>.tqs) and, with --redis, the Redis tier
(keys PREFIX:<namespace>:<rank>:<block key>). PATH is the connector's disk_dir, a directory below it, or a recipe
YAML whose kv-transfer-config names the tiers (disk_dir, redis_url, redis_prefix, stats_file).

  ls      namespaces, ranks, segments/keys, records, bytes, record layout and format fingerprint digest
  stats   totals per tier and namespace, plus the connector's cumulative counters (stats_file)
  verify  reads every record and checks header, format fingerprint consistency and payload CRC-32;
          exit code 1 if a damaged record is found (the connector would recompute those blocks)

Read-only: nothing is modified."""


def add_store_subcommand(sub) -> None:
    st = sub.add_parser("store", help="inspect / verify the connector's disk tier (and Redis)", description=STORE_DOC,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ss = st.add_subparsers(dest="store_command", metavar="STORE_COMMAND")
    st.set_defaults(func=lambda a: (st.print_help(), 2)[1])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("path", nargs="?", help="disk_dir (or a directory below it) or a recipe .yaml")
    common.add_argument("--redis", metavar="URL", help="also (or only) the Redis tier at URL (env:NAME reads $NAME)")
    common.add_argument("--prefix", default=None, help="Redis key prefix (default: the recipe's redis_prefix or tqkv)")
    common.add_argument("--no-redis", action="store_true", help="ignore the recipe's Redis tier")
    common.add_argument("--json", action="store_true", help="one JSON object (for machines)")
    for name, hlp in (("ls", "list namespaces, ranks, segments and records"),
                      ("stats", "totals per tier and namespace and the connector's counters"),
                      ("verify", "check every record's header and CRC (exit 1 if any is damaged)")):
        p = ss.add_parser(name, parents=[common], help=hlp, description=STORE_DOC,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "stats":
            p.add_argument("--stats-file", help="the connector's stats_file (default: the recipe's)")
        if name == "verify":
            p.add_argument("--show", type=int, default=20, help="damaged records to list (default 20)")
        p.set_defaults(func=cmd_store)


class _StoreUsage(Exception):
    pass


def _store_targets(args):
    """(disk root | None, redis url | None, redis prefix, stats file | None) from PATH / recipe / options."""
    import os
    from pathlib import Path

    disk = redis_url = stats_file = None
    prefix = "tqkv"
    if args.path and args.path.endswith((".yaml", ".yml")):
        from tq_vllm.check import CheckUsageError, _as_dict, load_recipe
        try:
            raw = load_recipe(args.path)
        except CheckUsageError as e:
            raise _StoreUsage(str(e)) from None
        kvt = _as_dict(raw.get("kv-transfer-config", raw.get("kv_transfer_config"))) or {}
        if kvt.get("kv_connector") != "TQConnector":
            raise _StoreUsage(f"{args.path}: its kv-transfer-config does not use TQConnector; give the disk_dir "
                              f"instead")
        from tq_vllm.connector.config import ConnectorConfig
        try:
            cc = ConnectorConfig.from_extra_config(kvt.get("kv_connector_extra_config") or {})
        except ValueError as e:
            raise _StoreUsage(f"{args.path}: kv_connector_extra_config: {e}") from None
        disk = cc.disk_dir and os.path.expanduser(cc.disk_dir)
        prefix = cc.redis_prefix
        stats_file = cc.stats_file
        if cc.redis_url and not args.no_redis:
            redis_url = cc.resolved_redis_url
            if not redis_url:
                print(f"tq-vllm store: the recipe's redis_url {cc.redis_url} is not set in this environment; "
                      f"skipping Redis (pass --redis URL)", file=sys.stderr)
    elif args.path:
        disk = args.path
        if not Path(disk).is_dir():
            raise _StoreUsage(f"{disk!r} is not a directory: give the connector's disk_dir (kv_connector_extra_config"
                              f".disk_dir), a directory below it, or a recipe .yaml")
    if args.redis:
        redis_url = os.environ.get(args.redis[4:]) if args.redis.startswith("env:") else args.redis
        if not redis_url:
            raise _StoreUsage(f"--redis {args.redis}: ${args.redis[4:]} is not set")
    if args.prefix:
        prefix = args.prefix
    if getattr(args, "stats_file", None):
        stats_file = args.stats_file
    if disk and not Path(disk).is_dir():
        print(f"tq-vllm store: disk tier {disk} does not exist (nothing stored yet)", file=sys.stderr)
        disk = None
    if not disk and not redis_url and not stats_file:
        raise _StoreUsage("nothing to inspect: give the connector's disk_dir or a recipe .yaml, and/or --redis URL")
    return disk, redis_url, prefix, stats_file


def _scan_disk(root):
    """Segment files under root, grouped by namespace directory: {ns: {"files": [...], "tmp": [...]}}."""
    from pathlib import Path

    from tq_vllm.connector.disk import SEG_RE

    root = Path(root)
    groups: dict[str, dict] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.parent.relative_to(root)) if p.parent != root else "."
        if ".tqs.tmp-" in p.name:
            groups.setdefault(rel, {"files": [], "tmp": []})["tmp"].append(p)
            continue
        m = SEG_RE.match(p.name)
        if m:
            groups.setdefault(rel, {"files": [], "tmp": []})["files"].append((int(m.group(1)), m.group(2), p))
    return groups


def _expected_ranks(ranks) -> list[str]:
    import re

    from tq_vllm.connector.fingerprint import rank_names

    sizes = set()
    for r in ranks:
        m = re.fullmatch(r"t(\d+)of(\d+)p(\d+)of(\d+)", r)
        if m:
            sizes.add((int(m.group(2)), int(m.group(4))))
    if len(sizes) != 1:
        return sorted(ranks)
    tp, pp = sizes.pop()
    return rank_names(tp, pp)


def _read_header(f):
    """(fields of parse_header, fingerprint digest hex) of the record at f's position; raises RecordError."""
    from tq_vllm.connector.record import HEADER, HEADER_SIZE, parse_header

    head = f.read(HEADER_SIZE)
    fields = parse_header(head)
    return fields, HEADER.unpack_from(head)[6].hex(), head


def _file_info(path, verify=False, bad=None):
    """Record layout of one segment file; with verify, every record checked (damaged ones appended to `bad`)."""
    import os

    from tq_vllm.connector.record import HEADER_SIZE, RecordError, check_payload

    info = {"path": str(path), "bytes": os.path.getsize(path), "records": 0, "holes": 0, "damaged": 0,
            "record_bytes": None, "parts": None, "part_bytes": None, "fingerprints": set(), "error": None}
    size = info["bytes"]
    try:
        f = open(path, "rb")
    except OSError as e:
        info["error"] = f"io_error: {e}"
        return info
    with f:
        rec_size = None
        try:
            (nl, lb, plen, _, _), fp, _ = _read_header(f)
            rec_size = HEADER_SIZE + plen
            info.update(record_bytes=rec_size, parts=nl, part_bytes=lb)
            info["fingerprints"].add(fp)
        except RecordError as e:
            info["error"] = f"first record unreadable ({e.reason}); the connector cannot adopt this segment"
            if bad is not None:
                bad.append((str(path), 0, e.reason))
            info["damaged"] += 1
            return info
        n = size // rec_size
        info["records"] = n
        if size % rec_size:
            info["tail_bytes"] = size % rec_size
            if bad is not None:
                bad.append((str(path), n, f"truncated ({size % rec_size} stray bytes at the end)"))
                info["damaged"] += 1
        if not verify:
            return info
        for i in range(n):
            f.seek(i * rec_size)
            head = f.read(HEADER_SIZE)
            if not any(head):
                info["holes"] += 1  # written as zeros on purpose (a slot that was not what the index said)
                continue
            try:
                from tq_vllm.connector.record import HEADER, parse_header
                fields = parse_header(head)
                info["fingerprints"].add(HEADER.unpack_from(head)[6].hex())
                if HEADER_SIZE + fields[2] != rec_size:
                    raise RecordError("layout_mismatch", f"record size {HEADER_SIZE + fields[2]} != {rec_size}")
                payload = f.read(fields[2])
                check_payload(fields, [payload])
            except RecordError as e:
                info["damaged"] += 1
                bad.append((str(path), i, e.reason))
    return info


def _disk_report(root, verify=False):
    groups = _scan_disk(root)
    report = {"root": str(root), "namespaces": []}
    bad: list = []
    for ns, g in sorted(groups.items()):
        ranks = sorted({r for _, r, _ in g["files"]})
        segs: dict[int, dict] = {}
        files = []
        for seg, rank, path in sorted(g["files"]):
            info = _file_info(path, verify=verify, bad=bad)
            info.update(seg=seg, rank=rank)
            files.append(info)
            segs.setdefault(seg, {})[rank] = info
        expected = _expected_ranks(ranks)
        incomplete = sorted(s for s, rs in segs.items() if set(rs) != set(expected))
        fps = {r: sorted(set().union(*[i["fingerprints"] for i in files if i["rank"] == r])) for r in ranks}
        report["namespaces"].append({
            "namespace": ns, "ranks": ranks, "expected_ranks": expected, "segments": len(segs),
            "incomplete_segments": incomplete, "files": len(files), "bytes": sum(i["bytes"] for i in files),
            "records": sum(i["records"] for i in files), "holes": sum(i["holes"] for i in files),
            "damaged": sum(i["damaged"] for i in files),
            "record_bytes": sorted({i["record_bytes"] for i in files if i["record_bytes"]}),
            "parts": sorted({i["parts"] for i in files if i["parts"]}),
            "fingerprints": fps, "tmp_files": [str(p) for p in g["tmp"]],
            "errors": [f"{i['path']}: {i['error']}" for i in files if i["error"]],
            "mtime": _mtimes([i["path"] for i in files])})
    report["damaged"] = bad
    return report


def _mtimes(paths):
    import os
    import time
    ts = [os.path.getmtime(p) for p in paths if os.path.exists(p)]
    if not ts:
        return None
    f = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    return [f(min(ts)), f(max(ts))]


def _redis_report(url, prefix, verify=False):
    try:
        import redis
    except ImportError:
        raise _StoreUsage("the Redis tier needs the redis client: pip install redis (or tq-vllm[connector])") from None
    from tq_vllm.connector.record import HEADER_SIZE, RecordError, check_payload, parse_header

    cli = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        cli.ping()
    except Exception as e:
        raise _StoreUsage(f"cannot reach Redis at {url}: {type(e).__name__}: {e}; is the server up? (scripts/"
                          f"ensure_redis.sh starts one on this machine)") from None
    groups: dict[tuple, dict] = {}
    bad = []
    keys = list(cli.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 256):
        batch = keys[i:i + 256]
        pipe = cli.pipeline(transaction=False)
        for k in batch:
            (pipe.get if verify else pipe.strlen)(k)
        vals = pipe.execute()
        for k, v in zip(batch, vals):
            name = k.decode(errors="replace")
            parts = name[len(prefix) + 1:].split(":")
            if len(parts) != 3:
                continue  # not one of ours
            ns, rank, keyhex = parts
            g = groups.setdefault((ns, rank), {"namespace": ns, "rank": rank, "keys": 0, "bytes": 0, "damaged": 0,
                                               "record_bytes": set()})
            g["keys"] += 1
            if not verify:
                g["bytes"] += int(v or 0)
                continue
            if v is None:
                continue  # expired / evicted between SCAN and GET
            g["bytes"] += len(v)
            try:
                fields = parse_header(v[:HEADER_SIZE], key=bytes.fromhex(keyhex) if len(keyhex) == 32 else None)
                g["record_bytes"].add(HEADER_SIZE + fields[2])
                check_payload(fields, [memoryview(v)[HEADER_SIZE:HEADER_SIZE + fields[2]]])
            except (RecordError, ValueError) as e:
                g["damaged"] += 1
                bad.append((name, 0, getattr(e, "reason", str(e))))
    out = {"url": url, "prefix": prefix, "groups": [], "damaged": bad}
    for g in sorted(groups.values(), key=lambda g: (g["namespace"], g["rank"])):
        g["record_bytes"] = sorted(g["record_bytes"])
        out["groups"].append(g)
    return out


def _mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB"


def cmd_store(args) -> int:
    import json

    try:
        disk, redis_url, prefix, stats_file = _store_targets(args)
        verify = args.store_command == "verify"
        disk_rep = _disk_report(disk, verify=verify) if disk else None
        redis_rep = _redis_report(redis_url, prefix, verify=verify) if redis_url else None
    except _StoreUsage as e:
        print(f"tq-vllm store: {e}", file=sys.stderr)
        return 2
    stats = None
    if args.store_command == "stats" and stats_file:
        try:
            with open(stats_file) as f:
                stats = json.load(f)
        except (OSError, ValueError) as e:
            print(f"tq-vllm store: cannot read stats_file {stats_file}: {e}", file=sys.stderr)
    damaged = (len(disk_rep["damaged"]) if disk_rep else 0) + (len(redis_rep["damaged"]) if redis_rep else 0)
    if args.json:
        def default(o):
            return sorted(o) if isinstance(o, set) else str(o)
        print(json.dumps({"disk": disk_rep, "redis": redis_rep, "stats": stats, "damaged": damaged}, default=default))
        return 1 if verify and damaged else 0
    if disk_rep is not None:
        nss = disk_rep["namespaces"]
        print(f"disk tier {disk_rep['root']}: {len(nss)} namespace(s), "
              f"{sum(n['records'] for n in nss):,} records, {_mib(sum(n['bytes'] for n in nss))}")
        for n in nss:
            rb = "/".join(f"{b:,}" for b in n["record_bytes"]) or "?"
            nr = max(1, len(n["ranks"]))
            blocks = f" = {n['records'] // nr:,} blocks x {nr} ranks" if nr > 1 else ""
            print(f"  {n['namespace']}: ranks {','.join(n['ranks'])}; {n['segments']} segments, {n['records']:,} "
                  f"records{blocks} of {rb} B ({n['parts'] and n['parts'][0]} layer parts), {_mib(n['bytes'])}"
                  + (f", written {n['mtime'][0]} .. {n['mtime'][1]}" if n["mtime"] else ""))
            if args.store_command != "stats":
                for r, fps in n["fingerprints"].items():
                    print(f"    rank {r}: format fingerprint {', '.join(x[:16] for x in fps)}"
                          + (" (several formats in one namespace!)" if len(fps) > 1 else ""))
            if n["incomplete_segments"]:
                print(f"    {len(n['incomplete_segments'])} segment(s) lack a rank's file (ignored at restart): "
                      f"{n['incomplete_segments'][:10]}")
            if n["tmp_files"]:
                print(f"    {len(n['tmp_files'])} temporary file(s) of an interrupted write (removed at the next "
                      f"start)")
            if verify:
                print(f"    verified {n['records']:,} records: {n['damaged']} damaged, {n['holes']} holes "
                      f"(left empty on purpose)")
            for e in n["errors"]:
                print(f"    {e}")
    if redis_rep is not None:
        gs = redis_rep["groups"]
        print(f"Redis {redis_rep['url']} prefix {redis_rep['prefix']!r}: {sum(g['keys'] for g in gs):,} records, "
              f"{_mib(sum(g['bytes'] for g in gs))}")
        for g in gs:
            print(f"  {g['namespace']} rank {g['rank']}: {g['keys']:,} records, {_mib(g['bytes'])}"
                  + (f", {g['damaged']} damaged" if verify else ""))
    if stats is not None:
        from tq_vllm.connector.stats import summarize
        print(f"connector counters ({stats_file}, scheduler step {stats.get('scheduler_step', '?')}):")
        for k, v in summarize(stats).items():
            print(f"  {k}: {v}")
    if verify:
        bad = (disk_rep["damaged"] if disk_rep else []) + (redis_rep["damaged"] if redis_rep else [])
        for where, rec, reason in bad[:args.show]:
            print(f"  DAMAGED {where} record {rec}: {reason}")
        if len(bad) > args.show:
            print(f"  ... {len(bad) - args.show} more (--show N)")
        if bad:
            print(f"verify: {len(bad)} damaged record(s). The connector checks every record it reads and recomputes "
                  f"damaged blocks, so outputs stay correct; delete the listed segment files (all ranks' files of a "
                  f"segment) or Redis keys to reclaim the space, and check the disk / network if it recurs.")
            return 1
        print("verify: OK, no damaged records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
