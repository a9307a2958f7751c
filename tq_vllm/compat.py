"""Every difference between the vLLM versions tq_vllm runs on (0.26 CUDA, 0.32 CPU/CUDA, 0.33) lives here.

Feature detection, not version strings, decides the route; the version is only reported.

* Page size. 0.32+: `AttentionBackend.customize_spec(spec)` is vLLM's hook; tq_vllm returns the spec with
  `dtype=uint8, state_content_bytes=C` and declares the `LBHNC` layout, so every layer gets a contiguous
  `[num_blocks, H, block_size, C]` uint8 view. 0.26 has no such hook: the layer builds its spec itself. tq_vllm
  then overrides `get_kv_cache_spec` on *its own layer instances only* (not on the class, no other layer is
  touched) to return vLLM 0.26's in-tree `TQFullAttentionSpec(dtype=uint8, tq_slot_size=C)`, which vLLM already
  sizes, groups, merges and allocates exactly (`block_size * H * tq_slot_size` bytes per page) and
  `get_kv_cache_shape` gives the same `[num_blocks, H, block_size, C]` view. No `--kv-cache-dtype` is needed
  in either version.
* Metadata: 0.26 keeps `seq_lens_cpu`-style fields, 0.32 removed them (`seq_lens_cpu_upper_bound` instead);
  `host_step_inputs` hides that.
"""
from __future__ import annotations

import functools
import re

import torch


@functools.lru_cache(maxsize=None)
def vllm_version() -> tuple[int, int, int]:
    try:
        from vllm.version import __version_tuple__ as vt
        return tuple(int(x) if str(x).isdigit() else 0 for x in tuple(vt)[:3])  # type: ignore[return-value]
    except Exception:  # pragma: no cover - a vLLM without a version tuple
        import vllm
        nums = [int(x) for x in re.findall(r"\d+", getattr(vllm, "__version__", "0.0.0"))[:3]]
        return tuple(nums + [0] * (3 - len(nums)))  # type: ignore[return-value]


def vllm_version_str() -> str:
    try:
        import vllm
        return str(vllm.__version__)
    except Exception:  # pragma: no cover
        return "?"


@functools.lru_cache(maxsize=None)
def has_customize_spec() -> bool:
    """vLLM 0.32+: the backend can set its page size through `customize_spec`."""
    from vllm.v1.attention.backend import AttentionBackend
    return hasattr(AttentionBackend, "customize_spec")


def kv_cache_layouts():
    """0.32+: `(KVCacheLayout.LBHNC,)` (per-layer contiguous `[blocks, H, block_size, C]`); 0.26: None."""
    try:
        from vllm.v1.kv_cache_layout import KVCacheLayout
    except ImportError:
        return None
    return (KVCacheLayout.LBHNC,)


def current_vllm_config():
    """The config of the engine being built, or None outside of one."""
    try:
        from vllm.config import get_current_vllm_config_or_none
        return get_current_vllm_config_or_none()
    except ImportError:  # pragma: no cover - older vLLM
        from vllm.config import get_current_vllm_config
        try:
            return get_current_vllm_config()
        except Exception:
            return None


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_index(layer_name: str) -> int | None:
    """Decoder-layer index of an attention layer name (`model.layers.7.self_attn.attn` -> 7)."""
    m = _LAYER_RE.search(layer_name)
    if m:
        return int(m.group(1))
    nums = re.findall(r"\.(\d+)\.", "." + layer_name + ".")
    return int(nums[0]) if len(nums) == 1 else None


def num_hidden_layers(vllm_config) -> int | None:
    mc = getattr(vllm_config, "model_config", None)
    if mc is None:
        return None
    try:
        return int(mc.get_total_num_hidden_layers())
    except Exception:
        cfg = getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)
        n = getattr(cfg, "num_hidden_layers", None)
        return int(n) if n is not None else None


# --------------------------------------------------------------------------------------------- page size
def customize_spec_032(spec, bytes_per_token: int):
    """0.32+: the layer's FullAttentionSpec -> one uint8 page of `block_size * H * C` bytes per block."""
    from dataclasses import replace
    return replace(spec, dtype=torch.uint8, state_content_bytes=int(bytes_per_token))


def install_layer_spec_026(layer, backend_cls) -> None:
    """0.26 only: make *this* layer instance report vLLM's in-tree `TQFullAttentionSpec` with tq_vllm's bytes per
    token per KV head (the narrowest patch: an instance attribute on tq_vllm's own layers; the class and every
    other layer are untouched). The spec class is vLLM's own, registered with FullAttentionManager and grouped
    with FullAttentionSpec, so the allocator sizes, merges and zeroes it like its own TurboQuant pages."""
    if has_customize_spec():
        return
    from vllm.v1.kv_cache_interface import TQFullAttentionSpec

    orig = type(layer).get_kv_cache_spec

    def get_kv_cache_spec(vllm_config, _layer=layer, _orig=orig):
        spec = _orig(_layer, vllm_config)
        if spec is None or getattr(_layer, "sliding_window", None) is not None:
            return spec  # (sliding-window layers are refused earlier)
        bpt = backend_cls.bytes_per_token(_layer.head_size, spec.block_size)
        return TQFullAttentionSpec(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,
                                   head_size=spec.head_size, head_size_v=spec.head_size_v, dtype=torch.uint8,
                                   tq_slot_size=bpt)

    layer.get_kv_cache_spec = get_kv_cache_spec


# --------------------------------------------------------------------------------------------- metadata
def host_step_inputs(cam, block_size: int, device_path: bool | None = None):
    """Host copies of what the step planner needs, from vLLM's CommonAttentionMetadata.

    Returns (query_start_loc [R+1], seq_lens [R], ctx_block_ids [R], open_block_ids [R]) as CPU int64 tensors,
    where ctx_block_ids[r] is the id of block ctx//B when ctx % B != 0 else -1, and open_block_ids[r] the id of
    block seq//B when seq % B != 0 else -1.

    CPU: every tensor is already on the host (no copy). CUDA: query lengths come from `query_start_loc_cpu`;
    seq_lens and the two block ids per row are gathered on the device and fetched in ONE small D2H copy of
    3*R int32 (the only host sync tq_vllm adds per step; vLLM's CPU-side block table is not visible to
    attention builders, and `seq_lens_cpu_upper_bound` is inexact under async speculative decoding)."""
    R = int(cam.num_reqs)
    qsl = cam.query_start_loc_cpu[:R + 1].to(torch.int64)
    qlen = qsl[1:] - qsl[:-1]
    bt = cam.block_table_tensor[:R]
    seq_dev = cam.seq_lens[:R]
    if device_path is None:
        device_path = not (bt.device.type == "cpu" and seq_dev.device.type == "cpu")
    if not device_path:
        seq = seq_dev.to(torch.int64)
        ctx = seq - qlen
        return qsl, seq, _gather_ids(bt, ctx, seq, block_size), _gather_ids(bt, seq, seq, block_size)
    # device path: one packed D2H copy
    seq_d = seq_dev.to(torch.int64)
    ctx_d = seq_d - qlen.to(seq_d.device)
    packed = torch.stack([seq_d, _gather_ids(bt, ctx_d, seq_d, block_size),
                          _gather_ids(bt, seq_d, seq_d, block_size)]).to(torch.int64).cpu()
    return qsl, packed[0], packed[1], packed[2]


def _gather_ids(bt: torch.Tensor, pos: torch.Tensor, seq: torch.Tensor, block_size: int) -> torch.Tensor:
    """bt[r, pos[r] // B] where pos[r] % B != 0 (and the row is real), else -1."""
    R = bt.shape[0]
    if R == 0 or bt.shape[1] == 0:
        return torch.full((R,), -1, dtype=torch.int64, device=bt.device)
    col = torch.div(pos, block_size, rounding_mode="floor").clamp(0, bt.shape[1] - 1)
    ids = bt.gather(1, col.view(-1, 1).to(torch.int64)).view(-1).to(torch.int64)
    need = (pos % block_size != 0) & (seq > 0)
    return torch.where(need, ids, torch.full_like(ids, -1))


def host_seq_lens(cam) -> torch.Tensor | None:
    """Exact host seq_lens [R] (int64) without a device read, or None where vLLM gives none.

    0.26 and 0.32 both fill `seq_lens_cpu_upper_bound`, exact outside async speculative decoding (the caller does not
    ask then: a verification row's accepted length is only known on the device)."""
    ub = getattr(cam, "seq_lens_cpu_upper_bound", None)
    if ub is None or not isinstance(ub, torch.Tensor) or ub.device.type != "cpu":
        return None
    R = int(cam.num_reqs)
    if ub.shape[0] < R:
        return None
    return ub[:R].to(torch.int64)


def layer_kv_cache(layer) -> torch.Tensor | None:
    """A layer's bound KV cache tensor (vLLM keeps a list per virtual engine or the tensor), None before
    allocation."""
    kv = getattr(layer, "kv_cache", None)
    if isinstance(kv, (list, tuple)):
        kv = kv[0] if kv else None
    if isinstance(kv, torch.Tensor) and kv.dim() >= 1 and kv.numel() > 0:
        return kv
    return None


def layer_kv_blocks(layer) -> int | None:
    """Number of blocks of a layer's bound KV cache tensor (dim 0), or None before allocation."""
    kv = layer_kv_cache(layer)
    return None if kv is None else int(kv.shape[0])
