"""tq_vllm's vLLM attention backend: TurboQuant pages in vLLM's paged KV cache.

Selected with `--attention-backend CUSTOM` (GPU) — on vLLM's CPU platform the same flag works through the
CPU_ATTN override in `tq_vllm.attention.cpu_select`. Options come from `--additional-config '{"tq_vllm": ...}'`
(`tq_vllm.config`).

Pieces (docs/backend.md has the full story):
* `TQAttentionBackend` / `TQBoundaryBackend`: page size through `customize_spec` (0.32+) or the 0.26 layer-spec
  override (`tq_vllm.compat`); one uint8 tensor `[num_blocks, H, block_size, C]` per layer, C =
  PageLayout(...).bytes_per_token. Boundary layers (first/last N) are re-pointed to `TQBoundaryBackend`, whose
  pages use the boundary preset; vLLM groups and sizes them exactly.
* `TQMetadataBuilder`: planning of each step (which blocks become full, which staging slot holds each open
  block) into a `StepPlan`; the slots come from a device `SlotTable` (no device-to-host copy; CUDA default) or a
  host `StagingAllocator` (CPU, speculative decoding).
* `TQAttentionImpl`: store -> attention -> staging write per docs/design.md (`forward_includes_kv_cache_update`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from tq_vllm import compat
from tq_vllm.attention import ops
from tq_vllm.attention.capacity import Capacity, LayerCost, bytes_per_token
from tq_vllm.config import EXACT, TQConfig, TQConfigError  # noqa: F401  (re-exported)
from tq_vllm.quant.codec import LayerCodec, new_sink_table
from tq_vllm.quant.layout import SUPPORTED_HEAD_DIMS
from tq_vllm.quant.plan import (SlotTable, StagingAllocator, StagingEvictedError, StepPlan, completed_blocks,
                                  plan_rows)
from tq_vllm.quant.presets import PRESETS, Preset

# under vLLM's logger tree: same format, level (VLLM_LOGGING_LEVEL) and process prefixes as vLLM's own lines
logger = logging.getLogger("vllm.tq_vllm")

KERNEL_BLOCK_MULTIPLE = 16
PREFERRED_BLOCK_SIZE = 32


class TQUnsupportedError(ValueError):
    """A model or option tq_vllm refuses; the message says what and how to proceed."""


# ------------------------------------------------------------------------------------------- active config
_ACTIVE: dict[str, Any] = {"config": None, "vllm_config": None}


def active_config() -> TQConfig:
    """This process's tq_vllm options (parsed from the vLLM config of the engine being built)."""
    vc = compat.current_vllm_config()
    if vc is not None and vc is not _ACTIVE["vllm_config"]:
        _ACTIVE["config"], _ACTIVE["vllm_config"] = TQConfig.from_vllm_config(vc), vc
    if _ACTIVE["config"] is None:
        _ACTIVE["config"] = TQConfig()
    return _ACTIVE["config"]


def _set_active(vllm_config) -> TQConfig:
    if vllm_config is None:
        return active_config()
    if vllm_config is not _ACTIVE["vllm_config"]:
        _ACTIVE["config"], _ACTIVE["vllm_config"] = TQConfig.from_vllm_config(vllm_config), vllm_config
    return _ACTIVE["config"]


# ------------------------------------------------------------------------------------------------ backends
class TQAttentionBackend(AttentionBackend):
    """Compressed layers (the `preset`)."""

    tq_kind: ClassVar[str] = "main"
    forward_includes_kv_cache_update: bool = True  # store -> attention -> staging, in one op per layer
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # Any string passes vLLM's generic check: the impl explains a conflicting --kv-cache-dtype itself.
    supported_kv_cache_dtypes: ClassVar[list] = []

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # a static AttentionBackendEnum member: survives pickling into spawned processes

    @staticmethod
    def get_impl_cls():
        return TQAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TQMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(KERNEL_BLOCK_MULTIPLE)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int = 16) -> int:
        # vLLM asks this only when the user gave no --block-size. 32 tokens amortise each page's key mean and sink
        # tag over twice the tokens of 16 (tq4 at d=128: 134 vs 136 B per token and head, 3.82x vs 3.76x bf16)
        # and is the block size the kernels and the quality numbers were tuned with.
        b = max(int(default_block_size), PREFERRED_BLOCK_SIZE)
        return -(-b // KERNEL_BLOCK_MULTIPLE) * KERNEL_BLOCK_MULTIPLE

    # Refusals with tq_vllm's own messages happen in the impl (which also runs on the CPU platform, where vLLM
    # does not validate the backend); these say "yes" so vLLM's generic reasons don't pre-empt them.
    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return True

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        return False  # steps are planned from the host query lengths

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
                             use_mm_prefix, device_capability) -> str | None:
        if use_mla:
            return MLA_MESSAGE
        if use_sparse:
            return ("tq_vllm does not support sparse attention (DeepSeek-V3.2 style indexers); serve this model "
                    "without --attention-backend CUSTOM")
        return None

    # ---- page format of this backend's layers -----------------------------------------------------------
    @classmethod
    def layer_format(cls, config: TQConfig | None = None) -> Preset | None:
        """The preset of this backend's layers (None = exact pages)."""
        config = config or active_config()
        return config.preset if cls.tq_kind == "main" else config.boundary_preset

    @classmethod
    def bytes_per_token(cls, head_size: int, block_size: int, dtype: torch.dtype | None = None) -> int:
        """C: bytes per token per KV head of this backend's pages."""
        if dtype is None or dtype == torch.uint8:
            vc = compat.current_vllm_config() or _ACTIVE["vllm_config"]
            dtype = getattr(getattr(vc, "model_config", None), "dtype", torch.bfloat16)
        return bytes_per_token(cls.layer_format(), head_size, block_size, torch.empty((), dtype=dtype).element_size())

    @classmethod
    def customize_spec(cls, spec):
        """vLLM 0.32+: the allocator's page = block_size * H * C bytes of uint8."""
        from vllm.v1.kv_cache_interface import FullAttentionSpec
        if not isinstance(spec, FullAttentionSpec) or getattr(spec, "state_content_bytes", 0) is not None:
            return spec  # not ours to size, already sized, or vLLM 0.26 (no such field: see compat)
        return compat.customize_spec_032(spec, cls.bytes_per_token(spec.head_size, spec.block_size, spec.dtype))

    @classmethod
    def supported_kv_cache_layouts(cls):
        return compat.kv_cache_layouts()

    @classmethod
    def get_kv_cache_shape(cls, num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        """vLLM 0.26 only (0.32+ derives the view from the spec): the uint8 per-layer tensor."""
        return (num_blocks, num_kv_heads, block_size, cls.bytes_per_token(head_size, block_size))


class TQBoundaryBackend(TQAttentionBackend):
    """The first/last `boundary_layers` layers: `boundary_preset` pages (a preset, or exact bf16)."""

    tq_kind: ClassVar[str] = "boundary"


MLA_MESSAGE = ("tq_vllm does not support MLA models (DeepSeek-V2/V3, Kimi-K2, ...): their latent KV is not a "
               "per-head K/V pair that TurboQuant pages describe. Serve this model without --attention-backend "
               "CUSTOM (use vLLM's own MLA backends, optionally with --kv-cache-dtype fp8)")


# ------------------------------------------------------------------------------------------------ metadata
@dataclass
class TQMetadata(AttentionMetadata):
    num_actual_tokens: int
    plan: StepPlan
    num_decode_rows: int  # leading rows with one query token (vLLM puts decodes first for this backend)
    slot_mapping: torch.Tensor
    # speculative decoding: (slot, ctx_slot, n_old, query_start, n_new) per verification row whose open block
    # completes in this step: that block's exact tokens are also kept in `slot`, so a rejection that re-opens it
    # finds them (see TQMetadataBuilder._shadow_completed_blocks)
    shadows: tuple = ()
    # host (query_start_loc [R+1], seq_lens [R], ctx_lens [R]): the prefill plan is made from them, no device read
    host_rows: tuple | None = None
    # host arrays kept alive until the next step (sources of non-blocking H2D copies on CUDA)
    _keepalive: Any = None
    # kernel launch parameters per (KV heads, query heads), computed once per step from host data
    _meta: dict = None  # type: ignore[assignment]

    def kernel_meta(self, num_kv_heads: int, num_q_heads: int):
        if self._meta is None:
            self._meta = {}
        key = (num_kv_heads, num_q_heads)
        if key not in self._meta:
            self._meta[key] = ops.prepare_meta(self.plan, num_kv_heads, num_q_heads, self.num_decode_rows,
                                               host_rows=self.host_rows)
        return self._meta[key]


class _ScratchAllocator(StagingAllocator):
    """For dummy / capture batches: every open block goes to the one spare slot, nothing real is touched."""

    def __init__(self, slot: int):
        super().__init__(0)
        self.slot = slot

    def lookup(self, block_id: int) -> int:
        return self.slot

    def assign(self, block_id: int, reuse_slot: int | None = None) -> int:
        return self.slot


class TQMetadataBuilder(AttentionMetadataBuilder[TQMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = 1  # any order is correct; decodes first use the kernels' decode path

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """FULL CUDA graphs for single-token decode batches when the kernels are capture-safe (they say so),
        PIECEWISE (attention eager) otherwise; never on CPU or for exact boundary layers."""
        dev = getattr(getattr(vllm_config, "device_config", None), "device_type", "cuda")
        cfg = active_config()
        if cfg.has_boundary and cfg.boundary_preset is None:
            return AttentionCGSupport.NEVER  # exact boundary layers run a torch path with host syncs
        if dev == "cuda" and ops.kernels_graph_safe():
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self.config = _set_active(vllm_config)
        self.block_size = int(kv_cache_spec.block_size)
        sched = vllm_config.scheduler_config
        self.num_slots = self.config.num_staging_slots(int(sched.max_num_seqs))
        self.alloc = StagingAllocator(self.num_slots)
        self.scratch = _ScratchAllocator(self.num_slots)  # staging has num_slots + 1 entries
        self.device = torch.device(device)
        self.on_cpu = self.device.type == "cpu"
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        spec = getattr(vllm_config, "speculative_config", None)
        self.spec_tokens = int(getattr(spec, "num_speculative_tokens", 0) or 0) if spec is not None else 0
        if self.spec_tokens and self.spec_tokens + 1 >= self.block_size:
            raise TQUnsupportedError(
                f"tq_vllm: num_speculative_tokens={self.spec_tokens} needs block_size > {self.spec_tokens + 1} "
                f"(a verification step may cross at most one block boundary); raise --block-size")
        layers = bind_all_layers(vllm_config)
        for name in layer_names:  # staging sized for the final block size (it can change after model load)
            impl = getattr(layers.get(name), "impl", None)
            if isinstance(impl, TQAttentionImpl):
                impl.ensure_staging(self.block_size, self.num_slots + 1)
        self.graph_plans = (not self.on_cpu) and self.get_cudagraph_support(vllm_config, kv_cache_spec) != \
            AttentionCGSupport.NEVER
        self.layer_names = list(layer_names)
        mode = os.environ.get("TQ_VLLM_SLOT_PLANNER", "auto")
        if mode not in ("auto", "device", "host"):
            raise TQConfigError(f"tq_vllm: TQ_VLLM_SLOT_PLANNER={mode!r}: choose auto, device or host")
        # staging slots planned on the device (no device -> host copy per step) on CUDA, or when asked for; the host
        # planner where a step's exact lengths are only known on the device (speculative decoding)
        self.device_slots = (mode == "device" or (mode == "auto" and not self.on_cpu)) and not self.spec_tokens
        self.slot_table: SlotTable | None = None
        self._warmed = False
        if not self.on_cpu:
            self._alloc_buffers()
        log_capacity_once(vllm_config)

    def _alloc_buffers(self) -> None:
        """Persistent device buffers of the plan (CUDA graphs replay their addresses)."""
        sched = self.vllm_config.scheduler_config
        n = int(sched.max_num_batched_tokens) + int(sched.max_num_seqs) + 1
        mk = lambda: torch.full((n,), -1, dtype=torch.int32, device=self.device)  # noqa: E731
        self._bufs = {k: mk() for k in ("ctx_lens", "ctx_slot", "open_slot", "qb_row", "qb_idx")}

    # ------------------------------------------------------------------------------------------------ build
    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TQMetadata:
        return self._build(common_attn_metadata, self.alloc)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> TQMetadata:
        self._warm_up_kernels()
        return self._build(common_attn_metadata, self.scratch)

    def _warm_up_kernels(self) -> None:
        """Before the first CUDA-graph capture (outside it, before serving): compile the kernels that only prefill
        steps launch, once per page format, with the same arguments real steps pass. Best effort: a failure is
        logged and leaves the compile to the first request."""
        if self._warmed or self.on_cpu:
            return
        self._warmed = True
        layers = bind_all_layers(self.vllm_config)
        done = set()
        for name in self.layer_names:
            layer = layers.get(name)
            impl = getattr(layer, "impl", None)
            kv = compat.layer_kv_cache(layer)
            if not isinstance(impl, TQAttentionImpl) or impl.exact or impl.codec is None or kv is None:
                continue
            key = (impl.format.name if impl.format else None, impl.dtype, tuple(kv.shape[1:]), impl.sink is None)
            if key in done:
                continue
            done.add(key)
            try:
                ops.warm_up(impl.codec, kv, sink=impl.sink, workspace=impl.workspace, staging=impl.staging)
            except Exception as err:  # noqa: BLE001 - a warm-up must never stop the engine
                logger.warning("tq_vllm: kernel warm-up of %s failed (%s: %s); the first request compiles instead",
                               name, type(err).__name__, str(err)[:200])

    def _slot_table(self) -> SlotTable | None:
        """The device slot table, made at the first build (the KV cache tensors exist by then); None if the
        number of KV blocks is not known (the host planner is used then)."""
        if self.slot_table is None and self.device_slots:
            layers = bind_all_layers(self.vllm_config)
            nb = next((n for n in (compat.layer_kv_blocks(layers.get(x)) for x in self.layer_names) if n), None)
            if nb is None or self.num_slots >= (1 << SlotTable.SLOT_BITS):
                self._no_device_slots(f"{nb} KV blocks, {self.num_slots} staging slots")
                return None
            self.slot_table = SlotTable(self.num_slots, nb, self.device)
            logger.info("tq_vllm: staging slots planned on the device (%d slots, %d KV blocks)", self.num_slots, nb)
        return self.slot_table

    def _no_device_slots(self, why: str) -> None:
        if os.environ.get("TQ_VLLM_SLOT_PLANNER") == "device":
            raise TQConfigError(f"tq_vllm: TQ_VLLM_SLOT_PLANNER=device cannot be used here ({why}); unset it")
        self.device_slots = False
        logger.info("tq_vllm: staging slots planned on the host (%s)", why)

    def _build(self, cam: CommonAttentionMetadata, alloc: StagingAllocator) -> TQMetadata:
        B = self.block_size
        seq_host = compat.host_seq_lens(cam) if self.device_slots else None
        if self.device_slots and seq_host is None:
            self._no_device_slots("vLLM gives no host seq_lens_cpu_upper_bound")
        table = self._slot_table() if seq_host is not None else None
        if table is not None:
            return self._build_device_slots(cam, table, seq_host, capture=alloc is self.scratch)
        qsl, seq, ctx_ids, open_ids = compat.host_step_inputs(cam, B, device_path=not self.on_cpu)
        qlen = qsl[1:] - qsl[:-1]
        ctx = seq - qlen
        ctx_l, seq_l = ctx.tolist(), seq.tolist()
        try:
            cs, os_, qr, qi = plan_rows(ctx_l, seq_l, B, ctx_ids.tolist(), open_ids.tolist(), alloc)
        except StagingEvictedError:
            if alloc is self.scratch or not _is_dummy_batch(ctx_l, ctx_ids.tolist(), B):
                raise
            # a warm-up / dummy batch of vLLM (null block 0, no real request): plan it on the spare slot
            alloc = self.scratch
            cs, os_, qr, qi = plan_rows(ctx_l, seq_l, B, ctx_ids.tolist(), open_ids.tolist(), alloc)
        shadows = self._shadow_completed_blocks(alloc, qsl.tolist(), ctx_l, seq_l, cs, ctx_ids.tolist())
        return self._metadata(cam, qsl, seq, ctx_l, qr, qi, cs, os_, shadows)

    def _metadata(self, cam, qsl, seq, ctx_l, qr, qi, ctx_slot, open_slot, shadows=()) -> TQMetadata:
        """The step's TQMetadata from host rows (qsl [R+1], seq [R] int64, ctx_l), the completed blocks (qr, qi)
        and the staging slots: host lists (host planner) or device tensors [R] (device planner)."""
        R = len(ctx_l)
        ql = (qsl[1:] - qsl[:-1]).tolist()
        nd = 0
        while nd < R and ql[nd] == 1:
            nd += 1
        if not self.on_cpu:
            return self._cuda_metadata(cam, qsl, seq, ctx_l, qr, qi, ctx_slot, open_slot, nd, shadows)
        i32 = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.int32)  # noqa: E731
        plan = StepPlan(query_start_loc=qsl.to(torch.int32), seq_lens=seq.to(torch.int32), ctx_lens=i32(ctx_l),
                        ctx_slot=i32(ctx_slot), open_slot=i32(open_slot), qb_row=i32(qr), qb_idx=i32(qi),
                        block_table=cam.block_table_tensor[:R], block_size=self.block_size,
                        num_tokens=int(qsl[-1]), max_query_len=max(ql) if R else 0,
                        max_seq_len=int(seq.max()) if R else 0)
        return TQMetadata(num_actual_tokens=int(cam.num_actual_tokens), plan=plan, num_decode_rows=nd,
                          slot_mapping=cam.slot_mapping, shadows=shadows)

    def _cuda_metadata(self, cam, qsl, seq, ctx_l, qr, qi, ctx_slot, open_slot, nd, shadows=()) -> TQMetadata:
        """The CUDA StepPlan in persistent buffers (FULL CUDA graphs replay them), filled by stream-ordered copies.
        ctx_slot / open_slot: host lists (host planner) or device tensors [R] (device planner)."""
        B = self.block_size
        R = len(ctx_l)
        qlen = qsl[1:] - qsl[:-1]
        max_q = int(qlen.max()) if R else 0
        if self.graph_plans and R > 0 and max_q == 1 and int(qlen.min()) >= 0:
            # graph-safe plan: qb arrays padded to R with -1 (kernels skip qb_row < 0); host ints are upper bounds
            qr = qr + [-1] * (R - len(qr))
            qi = qi + [-1] * (R - len(qi))
            max_seq = self.max_model_len
        else:
            max_seq = int(seq.max()) if R else 0
        on_host = not isinstance(ctx_slot, torch.Tensor)
        host = _pinned(torch.tensor([ctx_l, ctx_slot, open_slot] if on_host else [ctx_l], dtype=torch.int32)) \
            if R else None
        hq = _pinned(torch.tensor([qr, qi], dtype=torch.int32).reshape(2, -1)) if qr else None
        b = self._bufs
        if host is not None:
            b["ctx_lens"][:R].copy_(host[0], non_blocking=True)
            b["ctx_slot"][:R].copy_(host[1] if on_host else ctx_slot, non_blocking=True)
            b["open_slot"][:R].copy_(host[2] if on_host else open_slot, non_blocking=True)
        M = len(qr)
        if hq is not None:
            b["qb_row"][:M].copy_(hq[0], non_blocking=True)
            b["qb_idx"][:M].copy_(hq[1], non_blocking=True)
        plan = StepPlan(query_start_loc=cam.query_start_loc[:R + 1], seq_lens=cam.seq_lens[:R],
                        ctx_lens=b["ctx_lens"][:R], ctx_slot=b["ctx_slot"][:R], open_slot=b["open_slot"][:R],
                        qb_row=b["qb_row"][:M], qb_idx=b["qb_idx"][:M], block_table=cam.block_table_tensor[:R],
                        block_size=B, num_tokens=int(qsl[-1]), max_query_len=max_q, max_seq_len=max_seq)
        host_rows = (qsl, seq, seq - qlen) if nd < R else None
        return TQMetadata(num_actual_tokens=int(cam.num_actual_tokens), plan=plan, num_decode_rows=nd,
                          slot_mapping=cam.slot_mapping, shadows=shadows, host_rows=host_rows,
                          _keepalive=(host, hq))

    def _build_device_slots(self, cam: CommonAttentionMetadata, table: SlotTable, seq: torch.Tensor,
                            capture: bool) -> TQMetadata:
        """The step plan with staging slots planned on the device (`SlotTable`): host data comes from vLLM's host
        copies (query_start_loc_cpu, seq_lens_cpu_upper_bound), nothing is read back from the device."""
        table.check()
        B = self.block_size
        R = int(cam.num_reqs)
        qsl = cam.query_start_loc_cpu[:R + 1].to(torch.int64)
        qlen = qsl[1:] - qsl[:-1]
        ctx = seq - qlen
        ctx_l = ctx.tolist()
        qr, qi = completed_blocks(ctx_l, seq.tolist(), B)
        cs, os_ = ops.plan_slots(table, cam.query_start_loc[:R + 1], cam.seq_lens[:R], cam.block_table_tensor[:R],
                                 B, capture=capture)
        table.record_error()
        return self._metadata(cam, qsl, seq, ctx_l, qr, qi, cs, os_)

    def _shadow_completed_blocks(self, alloc, qsl, ctx_l, seq_l, ctx_slots, ctx_ids) -> tuple:
        """Speculative decoding: a verification row (1 < q <= 1 + num_speculative_tokens) whose open block
        becomes full in this step may see some of its drafts rejected, and vLLM then rolls the request back into
        that block: the block is open again and its exact tokens must still be in staging. The planner hands the
        block's slot to the next open block, so keep a copy: map the completed block to a fresh slot that the
        impl fills (old staged tokens + this step's tokens) before the step runs."""
        if not self.spec_tokens or alloc is not self.alloc:
            return ()
        B = self.block_size
        out = []
        for r, (c, L) in enumerate(zip(ctx_l, seq_l)):
            q = L - c
            if not (1 < q <= self.spec_tokens + 1) or c % B == 0 or (c // B + 1) * B > L:
                continue
            slot = alloc.assign(int(ctx_ids[r]))
            b0 = (c // B) * B
            out.append((slot, int(ctx_slots[r]), c - b0, int(qsl[r]), b0 + B - c))
        return tuple(out)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


def _is_dummy_batch(ctx_lens, ctx_ids, B) -> bool:
    """vLLM's dummy/warm-up batches point every row at the null block (id 0), which no request ever owns."""
    return all(int(i) <= 0 for c, i in zip(ctx_lens, ctx_ids) if c % B)


# ----------------------------------------------------------------------------------------------------- impl
class TQAttentionImpl(AttentionImpl[TQMetadata]):
    supports_quant_query_input = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **kwargs) -> None:
        self.vllm_config = compat.current_vllm_config()
        self.num_heads = int(num_heads)
        self.head_size = int(head_size)
        self.scale = float(scale)
        self.num_kv_heads = int(num_kv_heads or num_heads)
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.sliding_window = sliding_window
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.config = _set_active(self.vllm_config)  # raises TQConfigError on bad options
        check_layer(self.vllm_config, num_heads=self.num_heads, head_size=self.head_size,
                    num_kv_heads=self.num_kv_heads, alibi_slopes=alibi_slopes, sliding_window=sliding_window,
                    kv_cache_dtype=kv_cache_dtype, logits_soft_cap=logits_soft_cap, attn_type=attn_type,
                    kv_sharing_target_layer_name=kv_sharing_target_layer_name, extra=kwargs)
        # filled by bind()
        self.layer_name: str | None = None
        self.layer_index: int | None = None
        self.format: Preset | None = None
        self.exact = False
        self.codec: LayerCodec | None = None
        self.staging: torch.Tensor | None = None
        self.sink: tuple | None = None  # (kv [N, 2, H, D], tags [N, H]) exact first tokens, when the preset has it
        self.workspace = None  # CUDA: the shared prefill workspace (kernels/prefill.py)
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    # ---- binding: the impl learns its layer (name, index, format) once the model is built ----------------
    @property
    def bound(self) -> bool:
        return self.layer_name is not None

    def bind(self, layer, name: str, index: int | None, backend: type[TQAttentionBackend], config: TQConfig,
             vllm_config) -> None:
        head_size_v = getattr(layer, "head_size_v", self.head_size)
        if head_size_v != self.head_size:
            raise TQUnsupportedError(
                f"tq_vllm: layer {name} has value head size {head_size_v} != key head size {self.head_size}; "
                f"tq_vllm pages hold K and V of one head size. Serve this model without --attention-backend CUSTOM")
        self.layer_name, self.layer_index = name, index
        self.format = backend.layer_format(config)
        self.exact = self.format is None
        mc = getattr(vllm_config, "model_config", None)
        self.dtype = getattr(mc, "dtype", None) or torch.get_default_dtype()
        self.device = _device_of(vllm_config)
        if not self.exact:
            self.codec = LayerCodec(self.format, self.head_size, _block_size(vllm_config), layer_index=index or 0,
                                    seed=config.seed, device=self.device)

    def ensure_staging(self, block_size: int, num_slots: int) -> None:
        """The exact staging buffer [num_slots, 2, B, H, D] (model dtype), allocated at model load so vLLM's
        memory profiling counts it; re-made only if the block size changed after load."""
        if self.exact:
            return
        shape = (num_slots, 2, block_size, self.num_kv_heads, self.head_size)
        if self.staging is not None and tuple(self.staging.shape) == shape:
            return
        if self.staging is not None:
            logger.warning("tq_vllm: %s: staging re-allocated for block size %d (after memory profiling)",
                           self.layer_name, block_size)
        if self.codec is None or self.codec.block_size != block_size:
            self.codec = LayerCodec(self.format, self.head_size, block_size, layer_index=self.layer_index or 0,
                                    seed=active_config().seed, device=self.device)
        self.staging = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.device.type == "cuda":
            from tq_vllm.kernels.prefill import workspace_for
            self.workspace = workspace_for(self.device, self.dtype, block_size, self.num_kv_heads, self.head_size,
                                           active_config().prefill_workspace_tokens)
        if self.codec.preset.sink and self.sink is None:
            self.sink = new_sink_table(active_config().sink_entries, self.num_kv_heads, self.head_size, self.dtype,
                                       self.device)
        if self.sink is not None and self.device.type == "cuda":
            from tq_vllm.kernels import sink_pending  # sized before any CUDA-graph capture (a row per slot)
            sink_pending(self.device, self.dtype, shape[0], self.num_kv_heads, self.head_size)

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        # Runs in the worker once the model is built and loaded, before vLLM asks for KV cache specs.
        if self.vllm_config is not None:
            bind_all_layers(self.vllm_config)

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: TQMetadata | None, output: torch.Tensor | None = None, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("tq_vllm: fused output quantization is not supported")
        assert output is not None
        if attn_metadata is None:  # profiling / warm-up without a KV cache
            return output
        if not self.bound:
            bind_all_layers(self.vllm_config or compat.current_vllm_config())
        n = attn_metadata.num_actual_tokens
        if n == 0:
            return output
        plan = attn_metadata.plan
        out = output[:n]
        if self.exact:
            ops.exact_forward(query[:n], key[:n], value[:n], kv_cache, plan, attn_metadata.slot_mapping,
                              self.scale, out)
        else:
            if self.staging is None:
                self.ensure_staging(plan.block_size, active_num_slots(self.vllm_config) + 1)
            for slot, cslot, n_old, q0, n_new in attn_metadata.shadows:
                st = self.staging
                if n_old:
                    st[slot, :, :n_old] = st[cslot, :, :n_old]
                st[slot, 0, n_old:n_old + n_new] = key[q0:q0 + n_new].to(st.dtype)
                st[slot, 1, n_old:n_old + n_new] = value[q0:q0 + n_new].to(st.dtype)
            meta = attn_metadata.kernel_meta(self.num_kv_heads, self.num_heads) if not plan.seq_lens.is_cpu \
                else None
            ops.forward_step(self.codec, query[:n], key[:n], value[:n], kv_cache, self.staging, plan, self.scale,
                             out=out, sink=self.sink, meta=meta, workspace=self.workspace)
        return output


def active_num_slots(vllm_config) -> int:
    return active_config().num_staging_slots(int(vllm_config.scheduler_config.max_num_seqs))


def _device_of(vllm_config) -> torch.device:
    dev = getattr(getattr(vllm_config, "device_config", None), "device", None)
    dev = torch.device(dev if dev is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _block_size(vllm_config) -> int:
    return int(vllm_config.cache_config.block_size)


# ------------------------------------------------------------------------------------------------ binding
def bind_all_layers(vllm_config) -> dict:
    """Give every tq_vllm layer of the model its name, index and format; point boundary layers at
    TQBoundaryBackend (and, on vLLM 0.26, at the layer spec override); allocate staging. Idempotent."""
    from vllm.model_executor.layers.attention import Attention

    ctx = vllm_config.compilation_config.static_forward_context
    config = _set_active(vllm_config)
    nl = compat.num_hidden_layers(vllm_config)
    config.check_layers(nl)
    layers = {n: m for n, m in ctx.items() if isinstance(m, Attention)}
    todo = [(n, m) for n, m in layers.items() if isinstance(getattr(m, "impl", None), TQAttentionImpl)
            and not m.impl.bound]
    if not todo:
        return layers
    nslots = active_num_slots(vllm_config) + 1
    for name, layer in todo:
        idx = compat.layer_index(name)
        backend = TQBoundaryBackend if config.is_boundary(idx, nl) else TQAttentionBackend
        layer.attn_backend = backend
        compat.install_layer_spec_026(layer, backend)
        layer.impl.bind(layer, name, idx, backend, config, vllm_config)
        layer.impl.ensure_staging(_block_size(vllm_config), nslots)
    return layers


_LOGGED: set = set()


def model_capacity(vllm_config, num_blocks: int | None = None) -> Capacity:
    """The exact per-token cost of this model's tq_vllm layers (this rank) and, given num_blocks, its capacity."""
    from vllm.model_executor.layers.attention import Attention

    layers = []
    B = _block_size(vllm_config)
    for name, m in vllm_config.compilation_config.static_forward_context.items():
        if isinstance(m, Attention) and isinstance(getattr(m, "impl", None), TQAttentionImpl) \
                and m.kv_sharing_target_layer_name is None:
            be = m.attn_backend if isinstance(m.attn_backend, type) and issubclass(m.attn_backend,
                                                                                   TQAttentionBackend) \
                else TQAttentionBackend
            fmt = be.layer_format()
            layers.append(LayerCost(name, fmt.name if fmt is not None else EXACT, m.impl.num_kv_heads,
                                    m.impl.head_size, be.bytes_per_token(m.impl.head_size, B)))
    return Capacity(tuple(layers), B, num_blocks)


def log_capacity_once(vllm_config) -> None:
    num_blocks = getattr(vllm_config.cache_config, "num_gpu_blocks", None)
    key = (id(vllm_config), num_blocks)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    try:
        from vllm.distributed import get_tensor_model_parallel_rank
        if get_tensor_model_parallel_rank() != 0:
            return
    except Exception:
        pass
    cap = model_capacity(vllm_config, num_blocks)
    cfg = active_config()
    head = ""
    if cap.layers:
        d = cap.layers[0].head_dim
        c = bytes_per_token(cfg.preset, d, cap.block_size)
        head = f"{c} bytes/token/KV head at head_dim {d} ({4 * d / c:.2f}x smaller than bf16); "
    logger.info("tq_vllm %s on vLLM %s: %s, block size %d, %s%s [ops: %s]", _version(), compat.vllm_version_str(),
                cfg.describe(), cap.block_size, head, cap.summary() if cap.layers else "no tq_vllm layers",
                ops.forward_step_name())


def _version() -> str:
    import tq_vllm
    return tq_vllm.__version__


# ------------------------------------------------------------------------------------------------- checks
def check_layer(vllm_config, *, num_heads, head_size, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                logits_soft_cap, attn_type, kv_sharing_target_layer_name, extra) -> None:
    """Refuse what tq_vllm can't serve, with the reason and what to do instead."""
    no_custom = "Serve this model without --attention-backend CUSTOM"
    if attn_type != AttentionType.DECODER:
        raise TQUnsupportedError(
            f"tq_vllm compresses decoder self-attention only; this model has {getattr(attn_type, 'value', attn_type)}"
            f" attention layers (encoder or encoder-decoder cross attention, e.g. Whisper, T5, BERT). {no_custom}")
    if extra.get("sinks") is not None:
        raise TQUnsupportedError(
            "tq_vllm does not support attention sinks (learned per-head sink logits, e.g. gpt-oss). " + no_custom)
    if sliding_window is not None:
        layers, window = _sliding_layers(vllm_config)
        raise TQUnsupportedError(
            f"tq_vllm supports full causal attention only; this model uses sliding-window attention "
            f"(window {window or sliding_window}) in {layers}. If the window is not smaller than the context you "
            f"need, start vLLM with --disable-sliding-window (caps --max-model-len to the window, exact for the "
            f"model); otherwise {no_custom[0].lower() + no_custom[1:]}")
    if head_size not in SUPPORTED_HEAD_DIMS:
        raise TQUnsupportedError(
            f"tq_vllm: head size {head_size} is not supported (supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})."
            f" {no_custom}")
    if alibi_slopes is not None:
        raise TQUnsupportedError("tq_vllm does not support ALiBi position biases. " + no_custom)
    if logits_soft_cap:
        raise TQUnsupportedError(
            f"tq_vllm does not support attention logit soft-capping (soft cap {logits_soft_cap}, e.g. Gemma-2). "
            + no_custom)
    if kv_sharing_target_layer_name is not None:
        raise TQUnsupportedError("tq_vllm does not support cross-layer KV sharing (layers that reuse another "
                                 "layer's KV cache). " + no_custom)
    if num_heads % num_kv_heads:
        raise TQUnsupportedError(f"tq_vllm: {num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if kv_cache_dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise TQUnsupportedError(
            f"tq_vllm: --kv-cache-dtype {kv_cache_dtype} conflicts with the tq_vllm backend, which stores its own "
            f"format chosen by the preset (now {active_config().preset.name}). Drop --kv-cache-dtype and pick "
            f"the bits with --additional-config '{{\"tq_vllm\": {{\"preset\": \"tq3\"}}}}' (known presets: "
            f"{', '.join(PRESETS)})")
    if vllm_config is None:
        return
    cc = vllm_config.cache_config
    if getattr(cc, "kv_cache_dtype_skip_layers", None):
        raise TQUnsupportedError(
            "tq_vllm: --kv-cache-dtype-skip-layers does not apply to the tq_vllm backend; keep layers at higher "
            "precision with --additional-config '{\"tq_vllm\": {\"boundary_layers\": 2, \"boundary_preset\": "
            "\"tq8\"}}' (or \"bf16\")")
    dev = getattr(vllm_config.device_config, "device_type", "cpu")
    dtype = vllm_config.model_config.dtype
    if dev == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        raise TQUnsupportedError(f"tq_vllm on CUDA needs --dtype bfloat16 or float16 (got {dtype})")


def _sliding_layers(vllm_config) -> tuple[str, int | None]:
    cfg = None
    try:
        cfg = vllm_config.model_config.hf_text_config
    except Exception:
        pass
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        idx = [i for i, t in enumerate(types) if "sliding" in str(t)]
        if idx:
            return f"layers {idx} ({len(idx)} of {len(types)})", window
    n = getattr(cfg, "num_hidden_layers", None)
    mwl = getattr(cfg, "max_window_layers", None)
    if n is not None and mwl is not None and getattr(cfg, "use_sliding_window", True):
        return f"layers {list(range(mwl, n))}", window  # Qwen2 convention: layers >= max_window_layers
    return "all layers" if n is None else f"all {n} layers", window
