"""The device staging-slot planner (`SlotTable`): staging continuity over random request lifetimes, the spare slot
for dummy/capture rows, the delayed error, and no host sync (it runs on device tensors only)."""
from __future__ import annotations

import random

import pytest
import torch

from tq_vllm.quant.plan import SlotTable, StagingEvictedError


class _Sim:
    """Requests with block lists from a recycled block pool; one step = a batch of (request, new tokens)."""

    def __init__(self, B, num_blocks, max_blocks, seed):
        self.B, self.rng = B, random.Random(seed)
        self.free = list(range(1, num_blocks))  # block 0 is vLLM's null block
        self.rng.shuffle(self.free)
        self.max_blocks = max_blocks
        self.reqs = {}  # id -> dict(len, blocks, slot (staging slot of its open block, from the last plan))
        self.next_id = 0

    def add(self):
        self.reqs[self.next_id] = dict(len=0, blocks=[], slot=None)
        self.next_id += 1

    def finish(self, rid):
        r = self.reqs.pop(rid)
        self.free += r["blocks"]  # ids are reused by later requests (stale table entries must not confuse the plan)
        self.rng.shuffle(self.free)

    def batch(self, rows):
        """rows: [(rid, n_new)] -> (query_start_loc, seq_lens, block_table) tensors and the expected ctx slots."""
        B = self.B
        qsl, seq, bt, expect = [0], [], [], []
        for rid, n in rows:
            r = self.reqs[rid]
            c, L = r["len"], r["len"] + n
            while len(r["blocks"]) < -(-L // B):
                r["blocks"].append(self.free.pop())
            qsl.append(qsl[-1] + n)
            seq.append(L)
            bt.append(r["blocks"] + [0] * (self.max_blocks - len(r["blocks"])))
            expect.append(r["slot"] if c % B else -1)
        i32 = dict(dtype=torch.int32)
        return (torch.tensor(qsl, **i32), torch.tensor(seq, **i32), torch.tensor(bt, **i32).view(len(rows), -1),
                expect)


def _check_step(sim, tab, rows, cs, os_):
    B = sim.B
    cs, os_ = cs.tolist(), os_.tolist()
    live_open = []
    for (rid, n), c_slot, o_slot in zip(rows, cs, os_):
        r = sim.reqs[rid]
        r["len"] += n
        if r["len"] % B:
            assert 0 <= o_slot < tab.num_slots, (rid, o_slot)
            r["slot"] = o_slot
            live_open.append(o_slot)
        else:
            assert o_slot == -1
            r["slot"] = None
    # every open block of a scheduled request has its own slot; unscheduled open blocks keep theirs
    others = [r["slot"] for rid, r in sim.reqs.items() if r["slot"] is not None and rid not in dict(rows)]
    assert len(set(live_open)) == len(live_open)
    assert not set(live_open) & set(others), "a slot was given to a new block while another open block holds it"


@pytest.mark.parametrize("B,seed", [(16, 0), (32, 1), (64, 2)])
def test_staging_continuity_over_random_lifetimes(B, seed):
    """Random arrivals, prefill chunks, decodes, finishes (block ids recycled), requests skipped for some steps:
    each row that continues a block gets the slot that block was given, open blocks never share a slot, no error."""
    max_seqs = 12
    sim = _Sim(B, num_blocks=400, max_blocks=40, seed=seed)
    tab = SlotTable(max_seqs + 4, 400, "cpu")
    rng = random.Random(seed + 10)
    for _ in range(6):
        sim.add()
    for step in range(300):
        if len(sim.reqs) < max_seqs and rng.random() < 0.3:
            sim.add()
        ids = list(sim.reqs)
        rng.shuffle(ids)
        rows = []
        for rid in ids:
            if rng.random() < 0.1:  # not scheduled in this step (token budget)
                continue
            r = sim.reqs[rid]
            n = rng.choice([1, 1, 1, 2, 5, B - 1, B, 2 * B + 3]) if r["len"] < 6 * B else 1
            if r["len"] + n > 38 * B:
                continue
            rows.append((rid, n))
        if not rows:
            continue
        qsl, seq, bt, expect = sim.batch(rows)
        cs, os_ = tab.plan(qsl, seq, bt, B)
        assert cs.tolist() == expect, f"step {step}"
        _check_step(sim, tab, rows, cs, os_)
        for rid in [x for x in sim.reqs if sim.reqs[x]["len"] > 30 * B or rng.random() < 0.03]:
            sim.finish(rid)
    assert int(tab.err) == 0
    tab.record_error()
    tab.check()


def test_dummy_and_capture_rows_use_the_spare_slot_and_change_nothing():
    B = 16
    tab = SlotTable(4, 64, "cpu")
    qsl = torch.tensor([0, 1, 5], dtype=torch.int32)
    seq = torch.tensor([21, 4], dtype=torch.int32)
    bt = torch.tensor([[3, 7, 0], [9, 0, 0]], dtype=torch.int32)
    cs, os_ = tab.plan(qsl, seq, bt, B)  # row 0 continues an unknown block: error 1, spare slot
    assert cs.tolist() == [4, -1] and os_.tolist()[0] == 4 and 0 <= os_.tolist()[1] < 4
    assert int(tab.err) == 1
    before = [t.clone() for t in (tab.slot_block, tab.slot_stamp, tab.block_slot)]
    # capture batch: every row on the spare slot, the tables untouched
    cs, os_ = tab.plan(qsl, seq, torch.tensor([[5, 6, 0], [8, 0, 0]], dtype=torch.int32), B, capture=True)
    assert cs.tolist() == [4, -1] and os_.tolist() == [4, 4]
    # vLLM's dummy rows point at the null block 0
    cs, os_ = tab.plan(torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
                       torch.zeros(1, 2, dtype=torch.int32), B)
    assert cs.tolist() == [-1] and os_.tolist() == [4]
    for a, b in zip(before, (tab.slot_block, tab.slot_stamp, tab.block_slot)):
        assert torch.equal(a[:-1], b[:-1])


def test_eviction_is_reported_at_the_next_check():
    """More open blocks than slots (a misconfiguration the config check normally refuses): the request whose slot
    was reused is flagged, and the host raises the documented error."""
    B = 16
    tab = SlotTable(2, 64, "cpu")
    i32 = dict(dtype=torch.int32)
    # step 1: three requests open blocks 1, 2, 3 with 3 tokens each -> only 2 slots: error 2
    cs, os_ = tab.plan(torch.tensor([0, 3, 6, 9], **i32), torch.tensor([3, 3, 3], **i32),
                       torch.tensor([[1], [2], [3]], **i32), B)
    assert int(tab.err) & 2
    tab.record_error()
    with pytest.raises(StagingEvictedError, match="staging_slots"):
        tab.check()


def test_free_slots_first_then_least_recently_used():
    """A slot freed by a completed block is taken before the stale slot of a request that left."""
    B = 16
    tab = SlotTable(3, 64, "cpu")
    i32 = dict(dtype=torch.int32)
    # the request that will leave comes first in the batch: its slot is the least recently touched one
    cs, os_ = tab.plan(torch.tensor([0, 5, 10], **i32), torch.tensor([5, 5], **i32), torch.tensor([[2], [1]], **i32),
                       B)
    s2, s1 = os_.tolist()
    # request 1 completes block 1 (5 + 11 = 16 tokens); request 2 is gone (its slot s2 is stale)
    cs, os_ = tab.plan(torch.tensor([0, 11], **i32), torch.tensor([16], **i32), torch.tensor([[1, 4]], **i32), B)
    assert cs.tolist() == [s1] and os_.tolist() == [-1]
    # two new requests: the never-used slot and the freed s1 come before the stale s2
    cs, os_ = tab.plan(torch.tensor([0, 2, 4], **i32), torch.tensor([2, 2], **i32), torch.tensor([[5], [6]], **i32), B)
    assert sorted(os_.tolist()) == sorted({0, 1, 2} - {s2})
    assert int(tab.err) == 0


def test_a_slot_read_in_this_step_is_not_handed_out_in_it():
    """The slot of a block that completes in this step is still read by this step's store: a new block opened in
    the same step must not get it, even though it is free afterwards."""
    B = 16
    tab = SlotTable(2, 64, "cpu")
    i32 = dict(dtype=torch.int32)
    cs, os_ = tab.plan(torch.tensor([0, 5, 10], **i32), torch.tensor([5, 5], **i32), torch.tensor([[1], [2]], **i32),
                       B)
    a, b = os_.tolist()
    cs, os_ = tab.plan(torch.tensor([0, 11, 14], **i32), torch.tensor([16, 3], **i32),
                       torch.tensor([[1, 0], [3, 0]], **i32), B)
    assert cs.tolist() == [a, -1]
    assert os_.tolist() == [-1, b]  # b (stale: its request was not scheduled) rather than a


@pytest.mark.parametrize("B,seed,dev", [(16, 3, "cpu"), (32, 4, "cpu"),
                                        pytest.param(32, 5, "cuda", marks=pytest.mark.gpu)])
def test_triton_planner_equals_the_torch_planner(B, seed, dev, monkeypatch):
    """The one-program Triton planner (CUDA default) against the torch reference (in the interpreter on CPU): the
    same slots and the same tables after every step of a random schedule, including capture and dummy steps."""
    if dev == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tq_vllm import kernels as K
    max_seqs = 10
    sim = _Sim(B, num_blocks=300, max_blocks=24, seed=seed)
    t_ref, t_tri = SlotTable(max_seqs + 3, 300, dev), SlotTable(max_seqs + 3, 300, dev)
    rng = random.Random(seed)
    for _ in range(4):
        sim.add()
    for step in range(60):
        if len(sim.reqs) < max_seqs and rng.random() < 0.3:
            sim.add()
        rows = [(rid, rng.choice([1, 1, 2, B - 1, B + 3]) if sim.reqs[rid]["len"] < 4 * B else 1)
                for rid in sim.reqs if rng.random() < 0.9 and sim.reqs[rid]["len"] < 20 * B]
        if not rows:
            continue
        qsl, seq, bt, _ = (x.to(dev) if torch.is_tensor(x) else x for x in sim.batch(rows))
        capture = step % 17 == 5
        a = t_ref.plan(qsl, seq, bt, B, capture=capture)
        b = K.plan_slots(t_tri, qsl, seq, bt, B, capture=capture, force="triton")
        assert [x.tolist() for x in a] == [x.tolist() for x in b], f"step {step}"
        for name in ("slot_block", "slot_stamp", "block_slot", "err"):
            x, y = getattr(t_ref, name), getattr(t_tri, name)
            n = x.numel() - (name != "err")  # the torch planner's write sink (last entry) may differ
            assert torch.equal(x[:n], y[:n]), (step, name)
        if not capture:
            for (rid, n), o in zip(rows, a[1].tolist()):
                r = sim.reqs[rid]
                r["len"] += n
                r["slot"] = o if r["len"] % B else None
        for rid in [x for x in sim.reqs if sim.reqs[x]["len"] > 18 * B or rng.random() < 0.05]:
            sim.finish(rid)


def test_a_batch_wider_than_the_table_takes_the_torch_planner(monkeypatch):
    """More rows than the Triton planner's compiled width (never seen from vLLM: rows <= max_num_seqs < slots):
    the torch planner serves the step, with the same result as planning it directly."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from tq_vllm import kernels as K
    B, R = 16, 40
    i32 = dict(dtype=torch.int32)
    qsl, seq = torch.arange(R + 1, **i32) * 3, torch.full((R,), 3, **i32)
    bt = torch.arange(1, R + 1, **i32).view(R, 1)
    a, b = SlotTable(60, 64, "cpu"), SlotTable(60, 64, "cpu")
    a.scratch = tuple(t[:16] for t in a.scratch)  # a table compiled 16 rows wide
    x = K.plan_slots(a, qsl, seq, bt, B, force="triton")
    y = b.plan(qsl, seq, bt, B)
    assert [t.tolist() for t in x] == [t.tolist() for t in y] and a.step == b.step == 1
    assert sorted(x[1].tolist()) == list(range(R)) and int(a.err) == 0
