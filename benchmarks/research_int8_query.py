#!/usr/bin/env python
"""Research: what an int8 query costs in accuracy, before building an integer-MMA score path.

The decode kernels are bound by ALU instructions (docs/kernels.md, Open), about 1.5 per 4-bit code, much of it
spreading the looked-up bytes into fp16 halves and setting their signs. Keys decoded straight into int8 operands of an
integer MMA would skip that, but the MMA then needs the query in int8 as well. This script measures that accuracy
price on a real model: perplexity with the rotated query q' = Π q rounded to int8 per (token, query head), scale
max|q'| / 127, in the scores against coded keys (the block mean's term included, which is pessimistic: a kernel could
keep it in fp16), while the exact keys of the query's own block keep the full query, as the kernels' exact split does.

    python benchmarks/research_int8_query.py [--presets tq4 tq3] [--tokens 2048 --windows 2] [--p-int8] [--out FILE]

Prints a table (bf16, each preset, each preset with the int8 query, with --p-int8 also with the coded keys'
probabilities rounded to int8 per tile of 128 keys, what values through an integer MMA would need) and appends one
row per measurement to benchmarks/results/quality.jsonl with "kind": "research_int8_query". CPU only, decode
semantics (tq_vllm.eval.attention), SmolLM2-135M-Instruct and Wikipedia from tq_vllm.assets.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from tq_vllm import assets  # noqa: E402
from tq_vllm.eval.attention import DecodeSemanticsAttention, block_span  # noqa: E402
from tq_vllm.eval.ppl import load_model, model_shape, text_windows, window_nll  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quality.jsonl"


def int8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """x `[..., D]` rounded to int8 steps of max|x| / 127 per vector, returned dequantized."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    return torch.round(x / s).clamp(-127, 127) * s


class Int8QueryAttention(DecodeSemanticsAttention):
    """Decode semantics with the query rounded to int8 in the rotated domain for the coded keys only. `p_int8`: the
    probabilities of the coded keys also rounded to int8 per (query, head, tile of TILE keys) at max p / 127 (what
    values through an integer MMA would need; the exact keys of the own block keep theirs)."""

    TILE = 128

    def __init__(self, *a, p_int8: bool = False, **kw):
        super().__init__(*a, **kw)
        self.p_int8 = p_int8

    def attend(self, layer, q, k, v, scale):
        lf = self.fmt.layer(layer, self.num_layers)
        if lf.semantics != "block":
            return super().attend(layer, q, k, v, scale)
        Tq, Hq, D = q.shape
        Tk, H, _ = k.shape
        G, off, B = Hq // H, Tk - Tq, lf.block_size
        q = q.to(torch.float32)
        k, v = self._round(k), self._round(v)
        n, kq, vq = self.coded_prefix(layer, k, v)
        codec = lf.codec(layer, D)
        q8 = codec.unrotate(int8_roundtrip(codec.rotate(q)))  # [Tq, Hq, D]
        rep = (lambda x: x.repeat_interleave(G, 1)) if G > 1 else (lambda x: x)
        out = torch.empty(Tq, Hq, D, dtype=torch.float32)
        rows = max(B, (self.max_chunk_elems // max(1, Hq * Tk)) // B * B)
        for r0 in range(0, Tq, rows):
            p0, p1 = off + r0, min(off + Tq, off + r0 + rows)
            qe, e0, mask = block_span(p0, p1, n, B)
            qc, qx = q8[r0:r0 + p1 - p0], q[r0:r0 + p1 - p0]
            s_c = torch.einsum("thd,jhd->htj", qc, rep(kq[:qe])) * scale  # coded keys: int8 query
            s_x = torch.einsum("thd,jhd->htj", qx, rep(k[e0:p1])) * scale  # own block: exact
            s = torch.cat([s_c, s_x], -1).masked_fill(~mask[None], float("-inf"))
            p = torch.softmax(s, -1)
            if self.p_int8 and qe:
                pc = p[..., :qe]
                nt = -(-qe // self.TILE)
                pt = torch.nn.functional.pad(pc, (0, nt * self.TILE - qe)).unflatten(-1, (nt, self.TILE))
                pt = int8_roundtrip(pt).clamp_min(0)
                p = torch.cat([pt.flatten(-2)[..., :qe], p[..., qe:]], -1)
            vals = rep(torch.cat([vq[:qe], v[e0:p1]]))
            out[r0:r0 + p1 - p0] = torch.einsum("htj,jhd->thd", p, vals)
        return out


def ppl(model, windows, fmt: str, cls, **kw) -> float:
    sess = cls(fmt, model_shape(model)["num_layers"], **kw)
    nll = cnt = 0
    for w in windows:
        a, b = window_nll(model, w.ids, sess)
        nll, cnt = nll + a, cnt + b
    return math.exp(nll / cnt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tq4", "tq3"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--p-int8", action="store_true", help="also: the coded keys' probabilities rounded to int8")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model_dir = assets.fetch_smollm2()
    model, tok = load_model(model_dir)
    windows = text_windows(tok, assets.fetch_wikipedia(), a.tokens, a.windows)
    base = ppl(model, windows, "bf16", DecodeSemanticsAttention)
    rows = [("bf16", "fp16 query", base)]
    for p in a.presets:
        rows.append((p, "fp16 query", ppl(model, windows, p, DecodeSemanticsAttention)))
        rows.append((p, "int8 query", ppl(model, windows, p, Int8QueryAttention)))
        if a.p_int8:
            rows.append((p, "int8 q and P", ppl(model, windows, p, Int8QueryAttention, p_int8=True)))
    print(f"SmolLM2-135M-Instruct, Wikipedia, {a.windows} x {a.tokens} tokens, decode semantics (CPU)")
    print(f"{'format':8} {'int8':13} {'ppl':>9} {'vs bf16':>9}")
    date = datetime.date.today().isoformat()
    with open(a.out, "a") as f:
        for fmt, qk, v in rows:
            print(f"{fmt:8} {qk:13} {v:9.4f} {100 * (v / base - 1):+8.2f}%")
            f.write(json.dumps({"kind": "research_int8_query", "device": "CPU", "date": date,
                                "model": "SmolLM2-135M-Instruct", "preset": fmt, "query": qk, "ppl": round(v, 5),
                                "vs_bf16_pct": round(100 * (v / base - 1), 3), "tokens": a.tokens,
                                "windows": a.windows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
