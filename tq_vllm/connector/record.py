"""The block record: how one block of one rank is written to disk and to Redis.

A record is a 64-byte header followed by the payload, the block's pages of every layer of this rank, in the
connector's layer order (the exact bytes of vLLM's pages: compressed pages with tq_vllm's backend):

    off size field
      0   4  magic        b"TQKV"
      4   2  version      RECORD_VERSION
      6   2  header_size  64
      8   4  num_layers   number of page parts (one per layer; two where a backend splits K and V)
     12   4  layer_bytes  bytes of one part (0 if the parts differ in size)
     16   8  payload_len
     24  16  fingerprint  blake2b-128 of the full format fingerprint (format, model, shard; see fingerprint.py)
     40  16  key          blake2b-128 of vLLM's chained block hash (identifies the whole prefix up to this block)
     56   4  payload_crc  CRC-32 of the payload (zlib.crc32: dependency-free, ~4 GB/s, catches flips/truncation)
     60   4  header_crc   CRC-32 of bytes 0..59

Everything is little-endian. A reader checks, in order: length, magic, version, header CRC, fingerprint, key,
layer count and sizes, payload CRC. Any mismatch raises `RecordError` with a `reason` that is counted; the caller
then treats the block as missing (vLLM recomputes it). Records in the CPU tier are kept as raw pages (the
in-process pool is trusted memory); header and CRC are made when a block leaves the process (disk, Redis) and
checked whenever it comes back.
"""
from __future__ import annotations

import hashlib
import struct
import zlib

MAGIC = b"TQKV"
RECORD_VERSION = 1
HEADER = struct.Struct("<4sHHIIQ16s16sI")  # without the trailing header CRC
HEADER_SIZE = HEADER.size + 4
assert HEADER_SIZE == 64, HEADER_SIZE

REASONS = ("missing", "io_error", "remote_unavailable", "slot_mismatch", "truncated", "bad_magic", "bad_version", "bad_header", "fingerprint_mismatch", "key_mismatch",
           "layout_mismatch", "checksum_mismatch")


class RecordError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def digest16(data: bytes | str) -> bytes:
    """The 16-byte digest used for keys and fingerprints."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.blake2b(data, digest_size=16).digest()


def block_key(block_hash: bytes | int) -> bytes:
    """Key of a block from vLLM's block hash (bytes in vLLM >= 0.11; ints in old builds)."""
    if isinstance(block_hash, int):
        block_hash = block_hash.to_bytes(32, "little", signed=True)
    elif not isinstance(block_hash, (bytes, bytearray)):
        # BlockHash is a NewType(bytes) in 0.26/0.32; older versions used a named tuple with a hash_value.
        hv = getattr(block_hash, "hash_value", None)
        block_hash = repr(block_hash if hv is None else hv).encode()
    return digest16(bytes(block_hash))


def crc32(buf) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


def pack_header_crc(fingerprint: bytes, key: bytes, num_layers: int, layer_bytes: int, payload_len: int,
                    payload_crc: int) -> bytes:
    """Header for a payload whose length and CRC are already known (payload written in pieces)."""
    head = HEADER.pack(MAGIC, RECORD_VERSION, HEADER_SIZE, num_layers, layer_bytes, payload_len, fingerprint, key,
                       payload_crc & 0xFFFFFFFF)
    return head + struct.pack("<I", crc32(head))


def pack_header(fingerprint: bytes, key: bytes, num_layers: int, layer_bytes: int, payload) -> bytes:
    """Header for `payload` (any buffer: bytes, memoryview, numpy array)."""
    mv = memoryview(payload).cast("B")
    return pack_header_crc(fingerprint, key, num_layers, layer_bytes, mv.nbytes, crc32(mv))


def make_record(fingerprint: bytes, key: bytes, num_layers: int, layer_bytes: int, payload) -> bytes:
    return pack_header(fingerprint, key, num_layers, layer_bytes, payload) + bytes(memoryview(payload).cast("B"))


def parse_header(head, *, fingerprint: bytes | None = None, key: bytes | None = None) -> tuple:
    """Checks a header; returns (num_layers, layer_bytes, payload_len, key, payload_crc)."""
    if len(head) < HEADER_SIZE:
        raise RecordError("truncated", f"header has {len(head)} of {HEADER_SIZE} bytes")
    head = bytes(head[:HEADER_SIZE])
    magic, version, hsize, nl, lb, plen, fp, k, pcrc = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise RecordError("bad_magic", repr(magic))
    if version != RECORD_VERSION or hsize != HEADER_SIZE:
        raise RecordError("bad_version", f"version {version} header {hsize}")
    (hcrc,) = struct.unpack_from("<I", head, HEADER.size)
    if hcrc != crc32(head[:HEADER.size]):
        raise RecordError("bad_header", "header CRC mismatch")
    if fingerprint is not None and fp != fingerprint:
        raise RecordError("fingerprint_mismatch", f"{fp.hex()} != {fingerprint.hex()}")
    if key is not None and k != key:
        raise RecordError("key_mismatch", f"{k.hex()} != {key.hex()}")
    return nl, lb, plen, k, pcrc


def check_record(record, *, fingerprint: bytes, key: bytes, num_layers: int, layer_bytes: int,
                 payload_len: int | None = None) -> memoryview:
    """Validates a whole record (header + payload); returns a view of the payload."""
    mv = memoryview(record).cast("B")
    nl, lb, plen, _, pcrc = parse_header(mv[:HEADER_SIZE], fingerprint=fingerprint, key=key)
    expect_len = num_layers * layer_bytes if payload_len is None else payload_len
    if nl != num_layers or lb != layer_bytes or plen != expect_len:
        raise RecordError("layout_mismatch", f"record has {nl} parts x {lb} B = {plen} B, expected "
                          f"{num_layers} x {layer_bytes} = {expect_len} B")
    if mv.nbytes < HEADER_SIZE + plen:
        raise RecordError("truncated", f"payload has {mv.nbytes - HEADER_SIZE} of {plen} bytes")
    payload = mv[HEADER_SIZE:HEADER_SIZE + plen]
    if crc32(payload) != pcrc:
        raise RecordError("checksum_mismatch")
    return payload


def crc32_parts(parts, crc: int = 0) -> int:
    for part in parts:
        crc = zlib.crc32(memoryview(part).cast("B"), crc)
    return crc & 0xFFFFFFFF


def check_payload(header_fields: tuple, parts) -> None:
    """Second half of a two-step read (header first, then the payload read straight into its destination pieces)."""
    _, _, plen, _, pcrc = header_fields
    n = sum(memoryview(p).cast("B").nbytes for p in parts)
    if n < plen:
        raise RecordError("truncated", f"payload has {n} of {plen} bytes")
    if crc32_parts(parts) != pcrc:
        raise RecordError("checksum_mismatch")
