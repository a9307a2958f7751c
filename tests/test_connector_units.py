"""Fast tests of the connector's parts without an engine: record format, config, index/planner, disk segments,
Redis tier (with outage), transfer engine (opaque page views, CPU pool) and the worker's failure handling."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
import torch

from tq_vllm.connector.config import ConnectorConfig, parse_bytes
from tq_vllm.connector.disk import SegmentStore
from tq_vllm.connector.index import CPU, DISK, TierIndex
from tq_vllm.connector.record import (
    HEADER_SIZE,
    RecordError,
    block_key,
    check_record,
    crc32_parts,
    make_record,
    pack_header_crc,
    parse_header,
)
from tq_vllm.connector.remote import RemoteStore
from tq_vllm.connector.transfer import BlockPool, build_parts, slot_runs

FP = b"F" * 16


# ----------------------------------------------------------------------------------------------- record format
def test_record_roundtrip_and_every_check():
    payload = os.urandom(4 * 1000)
    key = block_key(b"\x01" * 32)
    rec = make_record(FP, key, 4, 1000, payload)
    assert len(rec) == HEADER_SIZE + len(payload)
    assert bytes(check_record(rec, fingerprint=FP, key=key, num_layers=4, layer_bytes=1000)) == payload

    def reason(buf, **kw):
        args = dict(fingerprint=FP, key=key, num_layers=4, layer_bytes=1000)
        args.update(kw)
        with pytest.raises(RecordError) as e:
            check_record(buf, **args)
        return e.value.reason

    flipped = bytearray(rec)
    flipped[HEADER_SIZE + 1234] ^= 0x10
    assert reason(bytes(flipped)) == "checksum_mismatch"
    assert reason(rec[:-1]) == "truncated"
    assert reason(rec[:10]) == "truncated"
    assert reason(b"XXXX" + rec[4:]) == "bad_magic"
    bad_head = bytearray(rec)
    bad_head[8] ^= 1  # num_layers: header CRC catches it
    assert reason(bytes(bad_head)) == "bad_header"
    assert reason(rec, fingerprint=b"G" * 16) == "fingerprint_mismatch"
    assert reason(rec, key=block_key(b"\x02" * 32)) == "key_mismatch"
    assert reason(rec, num_layers=2, layer_bytes=2000) == "layout_mismatch"
    assert reason(bytes(HEADER_SIZE + len(payload))) == "bad_magic"  # a zero hole


def test_header_from_pieces_equals_contiguous():
    parts = [os.urandom(100), os.urandom(100), os.urandom(100)]
    head = pack_header_crc(FP, b"k" * 16, 3, 100, 300, crc32_parts(parts))
    assert head == make_record(FP, b"k" * 16, 3, 100, b"".join(parts))[:HEADER_SIZE]
    assert parse_header(head)[2] == 300


def test_block_key_types():
    assert len(block_key(b"abc")) == 16
    assert block_key(b"abc") != block_key(b"abd")
    assert len(block_key(12345)) == 16


# ----------------------------------------------------------------------------------------------- config
def test_config_parsing():
    assert parse_bytes("8G") == 8 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes(4096) == 4096
    cfg = ConnectorConfig.from_extra_config({"cpu_bytes": "1M", "disk_dir": "/x", "redis_ttl_s": "5", "save": "false"})
    assert cfg.cpu_bytes == 1 << 20 and cfg.disk_dir == "/x" and cfg.redis_ttl_s == 5 and cfg.save is False
    with pytest.raises(ValueError, match="unknown"):
        ConnectorConfig.from_extra_config({"cpu_byte": 1})
    with pytest.raises(ValueError):
        ConnectorConfig.from_extra_config({"redis_write": "sometimes"})
    os.environ["TQ_TEST_URL_X"] = "redis://h:1/0"
    assert ConnectorConfig.from_extra_config({"redis_url": "env:TQ_TEST_URL_X"}).resolved_redis_url == "redis://h:1/0"


# ----------------------------------------------------------------------------------------------- index / planner
def K(i: int) -> bytes:
    return block_key(i.to_bytes(8, "little"))


def test_index_lru_demotes_to_disk_and_respects_pins():
    idx = TierIndex(3, disk=True, disk_bytes=10**9, record_bytes=100)
    plan = idx.begin_step()
    for i in range(3):
        assert idx.plan_save(plan, block_id=i, key=K(i)) is not None
    assert idx.plan_save(plan, 9, K(0)) is None  # already stored: no second copy
    assert idx.plan_save(plan, 3, K(3)) is None  # all 3 slots pinned by this step's saves
    idx.end_step()
    assert [idx.tier_of(K(i)) for i in range(4)] == [CPU, CPU, CPU, None]
    # the duplicate save touched K(0): LRU order is now K(1), K(2), K(0)
    plan = idx.begin_step()
    item = idx.plan_save(plan, 3, K(3))  # evicts LRU K(1) -> demoted to a new segment first
    assert item is not None and item.slot == 1
    assert plan.save_demote is not None and plan.save_demote.items == [(1, K(1))]
    assert idx.tier_of(K(1)) == DISK and idx.disk[K(1)] == (plan.save_demote.seg, 0)
    idx.end_step()
    # loading K(1) from disk promotes it into a slot, evicting the LRU unpinned entry (K(0); K(2) is pinned
    # as this step's CPU hit) to disk first
    plan = idx.begin_step()
    a = idx.pin_for_load(plan, 50, K(2))
    b = idx.pin_for_load(plan, 51, K(1))
    assert a.src == CPU and b.src == DISK and b.slot == 0
    assert plan.load_demote.items == [(0, K(0))]
    assert idx.tier_of(K(1)) == CPU and K(1) in idx.disk  # inclusive disk tier
    idx.end_step()


def test_index_disk_budget_drops_whole_lru_segments():
    idx = TierIndex(1, disk=True, disk_bytes=250, record_bytes=100)  # 2 records fit
    for i in range(5):
        plan = idx.begin_step()
        idx.plan_save(plan, i, K(i))
        idx.end_step()
    # K(0..3) were demoted, one segment each; the budget keeps the 2 newest
    assert sorted(idx.segments) == [2, 3]
    assert idx.tier_of(K(0)) is None and idx.tier_of(K(1)) is None
    assert idx.tier_of(K(2)) == DISK and idx.tier_of(K(4)) == CPU
    assert idx.disk_used <= 250


def test_index_forget_and_adopt():
    idx = TierIndex(2, disk=True, disk_bytes=10**6, record_bytes=10)
    idx.adopt_segment(7, [K(1), b"", K(2)])
    assert idx.tier_of(K(1)) == DISK and idx.disk[K(2)] == (7, 2) and idx.next_seg == 8
    drops: list[int] = []
    idx.forget(K(1), drops)
    assert drops == []
    idx.forget(K(2), drops)
    assert drops == [7] and not idx.segments


# ----------------------------------------------------------------------------------------------- disk segments
def test_segments_atomic_write_read_scan_and_corruption(tmp_path):
    st = SegmentStore(tmp_path, "ns", "t0of1p0of1")
    parts = [[os.urandom(64), os.urandom(64)] for _ in range(3)]
    recs = [(pack_header_crc(FP, K(i), 2, 64, 128, crc32_parts(p)), *p) for i, p in enumerate(parts)]
    recs[1] = bytes(HEADER_SIZE + 128)  # a hole
    st.write_segment(5, recs)
    assert not list(st.dir.glob("*.tmp-*"))
    rs = HEADER_SIZE + 128
    dest = [bytearray(64), bytearray(64)]
    st.read_record_into(5, 2, rs, dest, fingerprint=FP, key=K(2), num_layers=2, layer_bytes=64)
    assert [bytes(d) for d in dest] == parts[2]
    with pytest.raises(RecordError) as e:
        st.read_record_into(5, 1, rs, dest, fingerprint=FP, key=K(1), num_layers=2, layer_bytes=64)
    assert e.value.reason == "bad_magic"
    assert st.scan(["t0of1p0of1"], rs) == [(5, [K(0), b"", K(2)])]
    assert st.scan(["t0of1p0of1", "t1of2p0of1"], rs) == []  # a rank's file missing: not adoptable
    # flip a payload byte -> checksum; truncate -> truncated; delete -> missing
    p = st.path(5)
    data = bytearray(p.read_bytes())
    data[2 * rs + HEADER_SIZE + 3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(RecordError) as e:
        st.read_record_into(5, 2, rs, dest, fingerprint=FP, key=K(2), num_layers=2, layer_bytes=64)
    assert e.value.reason == "checksum_mismatch"
    p.write_bytes(bytes(data[: 2 * rs + HEADER_SIZE + 10]))
    with pytest.raises(RecordError) as e:
        st.read_record_into(5, 2, rs, dest, fingerprint=FP, key=K(2), num_layers=2, layer_bytes=64)
    assert e.value.reason == "truncated"
    st.delete_segment(5)
    with pytest.raises(RecordError) as e:
        st.read_record_into(5, 0, rs, dest, fingerprint=FP, key=K(0), num_layers=2, layer_bytes=64)
    assert e.value.reason == "missing"
    (st.dir / "seg-0000000009.t0of1p0of1.tqs.tmp-1").write_bytes(b"partial")
    assert st.scan(["t0of1p0of1"], rs) == [] and not list(st.dir.glob("*.tmp-*"))


# ----------------------------------------------------------------------------------------------- Redis tier
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_dead_server_is_a_fast_miss():
    rs = RemoteStore(f"redis://127.0.0.1:{_free_port()}/0", "tqtest", "ns", timeout_s=0.2, retry_s=60)
    t = time.monotonic()
    assert rs.count_present([K(1), K(2)], ["r0"]) == 0
    assert rs.get_many("r0", [K(1)]) == [None]
    assert rs.put_many_sync("r0", [(K(1), b"x")]) is False
    assert not rs.available()  # circuit open: no further waits
    assert time.monotonic() - t < 2.0
    assert rs.take_counters()["redis_errors"] >= 1


@pytest.fixture()
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    pytest.importorskip("redis")
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    import redis

    cli = redis.Redis(port=port)
    for _ in range(100):
        try:
            cli.ping()
            break
        except Exception:
            time.sleep(0.05)
    yield port, proc
    proc.terminate()
    proc.wait(10)


def test_remote_roundtrip_and_outage_midway(private_redis):
    port, proc = private_redis
    rs = RemoteStore(f"redis://127.0.0.1:{port}/0", "tqtest", "ns", timeout_s=0.5, retry_s=0.2)
    rec = make_record(FP, K(1), 1, 10, b"0123456789")
    assert rs.put_many_sync("r0", [(K(1), rec)])
    rs.put_many_async("r1", [(K(1), rec), (K(2), rec)])
    rs.flush()
    assert rs.count_present([K(1), K(2)], ["r0"]) == 1
    assert rs.count_present([K(1), K(2)], ["r0", "r1"]) == 1
    assert rs.count_present([K(2), K(1)], ["r1"]) == 2
    assert rs.get_many("r0", [K(1), K(3)]) == [rec, None]
    proc.terminate()
    proc.wait(10)
    assert rs.get_many("r0", [K(1)]) == [None]  # server gone: a miss, never an exception
    assert rs.count_present([K(1)], ["r0"]) == 0


# ----------------------------------------------------------------------------------------------- transfer engine
def _fake_kv(num_blocks=16, layers=3, layout="block_first"):
    g = torch.Generator().manual_seed(0)
    caches = {}
    for l in range(layers):
        if layout == "block_first":  # tq_vllm: [num_blocks, H, block_size, C] uint8
            t = torch.randint(0, 256, (num_blocks, 2, 16, 40), generator=g, dtype=torch.uint8)
        elif layout == "kv_first":  # vLLM 0.26 FlashAttention: (2, num_blocks, block_size, H, D) bf16
            t = torch.randn(2, num_blocks, 16, 2, 8, generator=g).to(torch.bfloat16)
        elif layout == "permuted":  # [B, H, N, C] logical view of a (B, N, H, C) buffer
            t = torch.randn(num_blocks, 16, 2, 8, generator=g).to(torch.bfloat16).permute(0, 2, 1, 3)
        elif layout == "cross_layer":  # one (B, L, page) buffer: per-layer views with stride(0) = L * page
            if l == 0:
                base = torch.randint(0, 256, (num_blocks, layers, 2, 16, 8), generator=g, dtype=torch.uint8)
            t = base[:, l]
        caches[f"model.layers.{l}.attn"] = t
    return caches


@pytest.mark.parametrize("layout", ["block_first", "kv_first", "permuted", "cross_layer"])
def test_parts_and_pool_roundtrip(layout):
    caches = _fake_kv(layout=layout)
    parts = build_parts(caches, 16)
    assert len(parts) == (6 if layout == "kv_first" else 3)
    ref = {k: v.clone() for k, v in caches.items()}
    pool = BlockPool(parts, num_slots=8)
    pool.save([3, 4, 9], [5, 6, 2])
    # wipe the source blocks, then load them back into other blocks
    for t in caches.values():
        if layout == "kv_first":
            t[:, [3, 4, 9]] = 0
        else:
            t[[3, 4, 9]] = 0
    pool.load([5, 6, 2], [10, 11, 12])
    pool.load([2], [9])
    for name, t in caches.items():
        if layout == "kv_first":
            assert torch.equal(t[:, 10], ref[name][:, 3]) and torch.equal(t[:, 12], ref[name][:, 9])
            assert torch.equal(t[:, 9], ref[name][:, 9]) and torch.equal(t[:, 0], ref[name][:, 0])
        else:
            assert torch.equal(t[10], ref[name][3]) and torch.equal(t[11], ref[name][4])
            assert torch.equal(t[12], ref[name][9]) and torch.equal(t[9], ref[name][9])
            assert torch.equal(t[0], ref[name][0])
    # the slot's record payload is the block's bytes, layer after layer
    views = pool.slot_views(5)
    assert sum(v.nbytes for v in views) == pool.block_bytes


def test_slot_runs():
    assert list(slot_runs([4, 5, 6, 9, 10, 2], 0, 6)) == [(0, 4, 3), (3, 9, 2), (5, 2, 1)]
    assert list(slot_runs([4, 5, 6, 9], 1, 3)) == [(0, 5, 2)]


def test_parts_reject_unknown_layouts():
    with pytest.raises(ValueError):
        build_parts({"a": torch.zeros(3, 5)}, 16)


@pytest.mark.gpu
def test_pool_roundtrip_cuda():
    caches = {k: v.cuda() for k, v in _fake_kv(num_blocks=64).items()}
    ref = {k: v.clone() for k, v in caches.items()}
    pool = BlockPool(build_parts(caches, 64), num_slots=32, staging_bytes=3 * 2 * 16 * 40 * 3)  # 3 rows/chunk
    ids = list(range(0, 40, 2))
    pool.save(ids, list(range(20)))
    for t in caches.values():
        t.zero_()
    pool.load(list(range(20)), ids)
    torch.cuda.synchronize()
    for k in caches:
        assert torch.equal(caches[k][ids], ref[k][ids])


# ----------------------------------------------------------------------------------------------- fingerprints
def _fake_configs(tmp_path, *, preset="tq4", seed=None, block=16, tp=1, weights=b"w" * 10, staging=None, layers=2,
                  workspace=None):
    from types import SimpleNamespace as NS

    mdir = tmp_path / "model"
    mdir.mkdir(exist_ok=True)
    (mdir / "model.safetensors").write_bytes(weights)
    tq = {"preset": preset}
    if seed is not None:
        tq["seed"] = seed
    if staging is not None:
        tq["staging_slots"] = staging
    if workspace is not None:
        tq["prefill_workspace_tokens"] = workspace
    vc = NS(model_config=NS(model=str(mdir), revision=None, dtype="bfloat16", quantization=None,
                            hf_config=NS(to_dict=lambda: {"hidden_size": 256}), get_head_size=lambda: 64),
            cache_config=NS(cache_dtype="auto", prefix_caching_hash_algo="sha256"),
            parallel_config=NS(tensor_parallel_size=tp, pipeline_parallel_size=1),
            attention_config=NS(backend=None), additional_config={"tq_vllm": tq})
    spec = NS(block_size=block, head_size=64, num_kv_heads=2, page_size_bytes=1000)
    kc = NS(kv_cache_groups=[NS(kv_cache_spec=spec, layer_names=[f"l{i}" for i in range(layers)])])
    return vc, kc


def test_namespace_separates_formats_models_and_shards(tmp_path):
    pytest.importorskip("vllm")
    from tq_vllm.connector.fingerprint import full_fingerprint, namespace_string

    base = namespace_string(*_fake_configs(tmp_path))
    assert base == namespace_string(*_fake_configs(tmp_path))  # deterministic
    assert base == namespace_string(*_fake_configs(tmp_path, staging=64))  # staging slots: not a page format
    assert base == namespace_string(*_fake_configs(tmp_path, workspace=4096))  # nor the prefill workspace
    for kw in ({"preset": "tq3"}, {"seed": 1}, {"block": 32}, {"tp": 2}, {"weights": b"v" * 10}, {"layers": 3}):
        assert namespace_string(*_fake_configs(tmp_path, **kw)) != base, kw
    assert namespace_string(*_fake_configs(tmp_path), model_tag="v2") != base
    from tq_vllm.quant.layout import LAYOUT_VERSION

    assert f"tqv{LAYOUT_VERSION}:" in base  # PageLayout.fingerprint() is part of it
    fp = full_fingerprint(base, "t0of1p0of1", ["B"], [10, 10])
    assert fp != full_fingerprint(base, "t1of2p0of1", ["B"], [10, 10])
    assert fp != full_fingerprint(base, "t0of1p0of1", ["Other"], [10, 10])
