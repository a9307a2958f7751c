"""A small simulator of vLLM's paging for tests: random block ids, mixed batches, arbitrary chunking."""
from __future__ import annotations

import torch

from tq_vllm.quant.codec import LayerCodec, new_sink_table
from tq_vllm.quant.plan import StagingAllocator, make_step_plan


class PagedSim:
    """Holds one layer's pages + staging + sink table and runs steps through
    `op(codec, q, k, v, cache, staging, plan, scale, sink=...)`."""

    def __init__(self, codec: LayerCodec, num_kv_heads: int, num_blocks: int = 64, num_slots: int = 8,
                 dtype=torch.bfloat16, device="cpu", seed: int = 0, sink_entries: int = 4096):
        self.codec, self.H, self.B = codec, num_kv_heads, codec.block_size
        C = codec.layout.bytes_per_token
        g = torch.Generator().manual_seed(seed)
        # poison: random bytes, so an unwritten field never looks like a valid zero
        self.cache = torch.randint(0, 256, (num_blocks, num_kv_heads, self.B, C), generator=g,
                                   dtype=torch.uint8).to(device)
        self.staging = torch.randn(num_slots, 2, self.B, num_kv_heads, codec.head_dim, generator=g).to(device, dtype)
        self.sink = new_sink_table(sink_entries, num_kv_heads, codec.head_dim, dtype, device)
        self.alloc = StagingAllocator(num_slots)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.tables: dict[int, list[int]] = {}
        self.done: dict[int, int] = {}
        self.device = device

    def step(self, op, reqs, q_all, k_all, v_all, scale):
        """`reqs`: list of (req_id, n_new). `q_all[req_id]` etc.: the full sequences. Returns {req_id: out}."""
        qs, ks, vs, qsl, seq = [], [], [], [0], []
        for rid, n in reqs:
            c = self.done.get(rid, 0)
            L = c + n
            tab = self.tables.setdefault(rid, [])
            while len(tab) * self.B < L:
                tab.append(self.free.pop())
            assert L <= q_all[rid].shape[0], f"request {rid} scheduled past its length"
            qs.append(q_all[rid][c:L]); ks.append(k_all[rid][c:L]); vs.append(v_all[rid][c:L])
            qsl.append(qsl[-1] + n); seq.append(L)
        width = max(len(self.tables[r]) for r, _ in reqs)
        bt = torch.full((len(reqs), width), -1, dtype=torch.int32)
        for i, (rid, _) in enumerate(reqs):
            bt[i, :len(self.tables[rid])] = torch.tensor(self.tables[rid], dtype=torch.int32)
        plan = make_step_plan(torch.tensor(qsl), torch.tensor(seq), bt.to(self.device), self.B, self.alloc,
                              device=self.device)
        out = op(self.codec, torch.cat(qs).to(self.device), torch.cat(ks).to(self.device),
                 torch.cat(vs).to(self.device), self.cache, self.staging, plan, scale, sink=self.sink)
        res = {}
        for i, (rid, n) in enumerate(reqs):
            res[rid] = out[qsl[i]:qsl[i + 1]]
            self.done[rid] = seq[i]
        return res


def naive_decode_semantics(codec: LayerCodec, q, k, v, scale):
    """Independent oracle for one sequence: q [L, Hq, D], k/v [L, H, D]; position p sees earlier blocks
    quantized (each block coded on its own) and its own block exact; with a sink preset token 0 stays exact."""
    B = codec.block_size
    L, Hq, D = q.shape
    H = k.shape[1]
    nb = L // B
    kh, vh = k.float().clone(), v.float().clone()
    if nb:
        kb = k[:nb * B].reshape(nb, B, H, D)
        vb = v[:nb * B].reshape(nb, B, H, D)
        f = codec.encode_blocks(kb, vb)
        kk = codec.unrotate(codec.decode_fields(f, "k").permute(0, 2, 1, 3)).reshape(-1, H, D)
        vv = codec.unrotate(codec.decode_fields(f, "v").permute(0, 2, 1, 3)).reshape(-1, H, D)
        kh[:nb * B], vh[:nb * B] = kk, vv
        if codec.preset.sink:
            kh[0], vh[0] = k[0].float(), v[0].float()
    G = Hq // H
    out = torch.empty(L, Hq, D)
    for p in range(L):
        own = (p // B) * B
        kp = torch.cat([kh[:own], k[own:p + 1].float()]).repeat_interleave(G, 1)
        vp = torch.cat([vh[:own], v[own:p + 1].float()]).repeat_interleave(G, 1)
        s = torch.einsum("hd,khd->hk", q[p].float(), kp) * scale
        out[p] = torch.einsum("hk,khd->hd", torch.softmax(s, -1), vp)
    return out
