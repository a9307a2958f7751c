"""Format fingerprints: a block is only ever read back under the same format, model and shard.

* The *namespace* (scheduler and workers compute the same one from the config) names the disk directory and the
  Redis key prefix: page format (tq_vllm's `PageLayout.fingerprint()` with `LAYOUT_VERSION` when the tq_vllm
  backend is configured; vLLM's version and kv-cache dtype otherwise), head_dim, KV heads, block size, layer count,
  page bytes, model identity (name, revision, a digest of its config and of its weight files' sizes and first and
  last 64 KiB, dtype, weight quantization, `model_tag`), tensor/pipeline-parallel sizes, and the block-hash
  algorithm.
* The worker's *full fingerprint* adds what only the worker sees (its TP/PP rank, the actual attention backend and
  the byte parts of its KV tensors); its 16-byte digest is written into every record header and compared on
  every load.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from .record import digest16

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_files_digest(path: str) -> str:
    """Digest of a local model directory's weight files (name, size, first and last 64 KiB)."""
    p = Path(path)
    if not p.is_dir():
        return ""
    files = []
    for f in sorted(p.iterdir()):
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
            st = f.stat()
            files.append((str(f), st.st_size, st.st_mtime_ns))
    return _files_digest(tuple(files))


@functools.lru_cache(maxsize=16)
def _files_digest(files: tuple) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, size, _ in files:
        h.update(f"{Path(name).name}:{size}".encode())
        with open(name, "rb") as fh:
            h.update(fh.read(65536))
            if size > 131072:
                fh.seek(size - 65536)
                h.update(fh.read(65536))
    return h.hexdigest()


def _hf_config_digest(model_config) -> str:
    cfg = getattr(model_config, "hf_config", None)
    try:
        d = cfg.to_dict() if cfg is not None else {}
    except Exception:
        d = {"repr": repr(cfg)}
    d.pop("_name_or_path", None)
    d.pop("transformers_version", None)
    return hashlib.blake2b(json.dumps(d, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def tq_layout_fingerprint(vllm_config, head_dim: int, block_size: int) -> str | None:
    """Format of tq_vllm's pages when its additional_config section is present: the PageLayout fingerprint of the
    main and boundary presets (LAYOUT_VERSION included) plus every option that changes page bytes (seed of the
    rotations, boundary layers)."""
    add = getattr(vllm_config, "additional_config", None) or {}
    tq = add.get("tq_vllm") if isinstance(add, dict) else None
    if not isinstance(tq, dict):
        return None
    opts = {k: v for k, v in tq.items() if k not in ("staging_slots", "prefill_workspace_tokens")}  # no page bytes
    fps = []
    for name in (tq.get("preset", "tq4"), tq.get("boundary_preset") if tq.get("boundary_layers") else None):
        if not name or name == "bf16":
            fps.append(str(name))
            continue
        try:
            from tq_vllm.quant.layout import PageLayout

            fps.append(PageLayout(name, head_dim, block_size).fingerprint())
        except Exception as e:  # an unsupported combination: still keep formats apart
            fps.append(f"tq-invalid:{name}:{type(e).__name__}")
    return json.dumps({"layouts": fps, "opts": opts}, sort_keys=True, default=str)


def _backend_env() -> str:
    keys = sorted(k for k in os.environ
                  if k in ("VLLM_ATTENTION_BACKEND", "VLLM_KV_CACHE_LAYOUT", "TQ_VLLM")
                  or (k.startswith("TQ_VLLM") and any(w in k for w in ("ATTN", "BACKEND", "PRESET", "FORMAT"))))
    return ",".join(f"{k}={os.environ[k]}" for k in keys)


def namespace_string(vllm_config, kv_cache_config, model_tag: str = "") -> str:
    """The config-derived format namespace (identical in the scheduler and every worker)."""
    import vllm

    mc = vllm_config.model_config
    cc = vllm_config.cache_config
    pc = vllm_config.parallel_config
    group = kv_cache_config.kv_cache_groups[0]
    specs = getattr(group.kv_cache_spec, "kv_cache_specs", None)
    layer_specs = list(specs.values()) if isinstance(specs, dict) and specs else [group.kv_cache_spec]
    spec = layer_specs[0]
    block_size = int(spec.block_size)
    head_dim = int(getattr(spec, "head_size", 0) or mc.get_head_size())
    num_kv_heads = int(getattr(spec, "num_kv_heads", 0) or 0)
    layout_fp = tq_layout_fingerprint(vllm_config, head_dim, block_size)
    attn = getattr(vllm_config, "attention_config", None)
    backend = getattr(attn, "backend", None)
    fields = {
        "format": layout_fp or f"vllm{'.'.join(vllm.__version__.split('.')[:2])}:{cc.cache_dtype}",
        "backend_cfg": str(getattr(backend, "name", backend)),
        "env": _backend_env(),
        "head_dim": head_dim,
        "kv_heads": num_kv_heads,
        "block": block_size,
        "layers": len(group.layer_names),
        "groups": len(kv_cache_config.kv_cache_groups),
        "pages": [int(sp.page_size_bytes) for sp in layer_specs],
        "model": str(mc.model),
        "revision": str(getattr(mc, "revision", None)),
        "hf_config": _hf_config_digest(mc),
        "weights": model_files_digest(str(mc.model)),
        "dtype": str(mc.dtype),
        "quant": str(getattr(mc, "quantization", None)),
        "tag": model_tag,
        "tp": int(pc.tensor_parallel_size),
        "pp": int(pc.pipeline_parallel_size),
        "hash_algo": str(getattr(cc, "prefix_caching_hash_algo", "")),
    }
    return json.dumps(fields, sort_keys=True)


def namespace_digest(ns: str) -> str:
    return digest16(ns).hex()


def rank_names(tp: int, pp: int) -> list[str]:
    return [rank_name(t, tp, p, pp) for p in range(pp) for t in range(tp)]


def rank_name(tp_rank: int, tp: int, pp_rank: int, pp: int) -> str:
    return f"t{tp_rank}of{tp}p{pp_rank}of{pp}"


def full_fingerprint(ns: str, rank: str, backend_names: list[str], part_bytes: list[int]) -> bytes:
    return digest16(json.dumps({"ns": ns, "rank": rank, "backends": sorted(set(backend_names)),
                                "parts": part_bytes}, sort_keys=True))
