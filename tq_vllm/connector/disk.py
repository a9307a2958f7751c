"""Disk tier: segment files of fixed-size block records.

Layout: `<disk_dir>/<namespace>/seg-<id:010d>.<rank>.tqs`, where `namespace` is the hex digest of the format
namespace (format, model, parallel sizes; see fingerprint.py) and `rank` names this worker's shard
(`t<tp_rank>of<tp>p<pp_rank>of<pp>`). Record i of a segment starts at byte i * record_size (header + payload, see
record.py); a record that could not be produced is written as zeros (it fails its magic check when read).

Writes go to `<name>.tmp-<pid>` and are renamed into place (atomic on POSIX), optionally after fsync, so a reader
never sees a half-written segment and a crash leaves at most a temporary file (removed at the next start).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .record import HEADER_SIZE, RecordError, check_payload, parse_header

logger = logging.getLogger("vllm.tq_vllm.connector")

SEG_RE = re.compile(r"^seg-(\d{10})\.([A-Za-z0-9]+)\.tqs$")


def segment_name(seg: int, rank: str) -> str:
    return f"seg-{seg:010d}.{rank}.tqs"


class SegmentStore:
    """One rank's view of the disk tier for one namespace."""

    def __init__(self, root: str | os.PathLike, namespace: str, rank: str, *, fsync: bool = False):
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.fsync = fsync

    def path(self, seg: int, rank: str | None = None) -> Path:
        return self.dir / segment_name(seg, rank or self.rank)

    # ------------------------------------------------------------------ writing
    def write_segment(self, seg: int, records) -> int:
        """Writes an iterable of buffers (each one whole record, or a (header, payload) pair) atomically.

        Returns the bytes written. Raises OSError on failure (after removing the temporary file)."""
        final = self.path(seg)
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        n = 0
        try:
            with open(tmp, "wb", buffering=0) as f:
                for rec in records:
                    parts = rec if isinstance(rec, tuple) else (rec,)
                    for part in parts:
                        mv = memoryview(part).cast("B")
                        while mv.nbytes:
                            w = f.write(mv)
                            n += w
                            mv = mv[w:]
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
            if self.fsync:
                dfd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        return n

    def delete_segment(self, seg: int) -> None:
        try:
            self.path(seg).unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ reading
    def read_record_into(self, seg: int, rec: int, record_size: int, dests: list, *, fingerprint: bytes,
                         key: bytes, num_layers: int, layer_bytes: int) -> int:
        """Reads record `rec` of segment `seg` and checks it; the payload is read straight into `dests` (writable
        buffers whose sizes add up to the payload). Returns the bytes read. Raises RecordError."""
        path = self.path(seg)
        outs = [memoryview(d).cast("B") for d in dests]
        out_len = sum(o.nbytes for o in outs)
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(rec * record_size)
                head = f.read(HEADER_SIZE)
                fields = parse_header(head, fingerprint=fingerprint, key=key)
                nl, lb, plen, _, _ = fields
                if nl != num_layers or lb != layer_bytes or plen != out_len:
                    raise RecordError("layout_mismatch",
                                      f"record {nl}x{lb} ({plen} B), expected {num_layers}x{layer_bytes} ({out_len} B)")
                for out in outs:
                    got = 0
                    while got < out.nbytes:
                        r = f.readinto(out[got:])
                        if not r:
                            raise RecordError("truncated", f"{path.name} record {rec} ends early")
                        got += r
        except FileNotFoundError as e:
            raise RecordError("missing", str(e)) from None
        except OSError as e:
            raise RecordError("io_error", str(e)) from None
        check_payload(fields, outs)
        return HEADER_SIZE + plen

    # ------------------------------------------------------------------ recovery
    def scan(self, ranks: list[str], record_size: int, *, fingerprint_of: dict[str, bytes] | None = None
             ) -> list[tuple[int, list[bytes]]]:
        """Segments usable after a restart: every rank's file present; keys read from the first rank's headers.

        A record whose header does not parse ends that segment's list (a truncated or damaged file still yields
        the records before the damage; the damaged ones fail their checksum at load and are recomputed).
        Leftover temporary files are removed."""
        found: dict[int, set[str]] = {}
        for p in self.dir.iterdir():
            if ".tmp-" in p.name:
                try:
                    p.unlink()
                except OSError:
                    pass
                continue
            m = SEG_RE.match(p.name)
            if m:
                found.setdefault(int(m.group(1)), set()).add(m.group(2))
        out = []
        for seg in sorted(found):
            if not set(ranks) <= found[seg]:
                continue
            keys: list[bytes] = []
            want_fp = fingerprint_of.get(ranks[0]) if fingerprint_of else None
            try:
                with open(self.path(seg, ranks[0]), "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    for rec in range(size // record_size):
                        f.seek(rec * record_size)
                        try:
                            _, _, _, key, _ = parse_header(f.read(HEADER_SIZE), fingerprint=want_fp)
                        except RecordError:
                            keys.append(b"")  # keep record positions; an empty key is never looked up
                            continue
                        keys.append(key)
            except OSError as e:
                logger.warning("tq connector: cannot scan segment %s: %s", seg, e)
                continue
            out.append((seg, keys))
        return out
