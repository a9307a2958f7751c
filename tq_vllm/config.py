"""The plugin's options, read from vLLM's own config: `--additional-config '{"tq_vllm": {...}}'`.

Because they travel inside `VllmConfig.additional_config`, they reach every process (API server, engine core,
workers) with the config itself, and YAML recipes (`vllm serve --config recipe.yaml`) carry them:

    additional-config:
      tq_vllm: {preset: tq4, boundary_layers: 2, boundary_preset: tq8}

Keys (all optional):
  preset           KV format of the compressed layers: a preset name (`tq-vllm presets` lists them) or a dict of
                   Preset fields, optionally with "base": NAME. Default "tq4".
  boundary_layers  N: the first N and the last N decoder layers use `boundary_preset` instead (an int, or a
                   [first, last] pair). Default 0. Their pages are counted exactly by vLLM's allocator.
  boundary_preset  a preset name or "bf16" (exact pages in the model dtype). Default "tq8".
  staging_slots    exact staging slots per layer (one per open block); default max_num_seqs + margin.
  sink_entries     entries of each layer's exact first-token ("attention sink") table, content-addressed (token
                   0's K/V; docs/design.md); default 1024. More entries: fewer distinct first tokens share one.
  seed             seed of the per-layer rotations (must match between writer and reader of stored blocks).
  prefill_workspace_tokens
                   tokens of the per-GPU workspace that prefill/chunk steps dequantize pages into for vLLM's
                   FlashAttention (K and V, model dtype, shared by all layers; allocated at load so vLLM counts
                   it). Longer prefixes are attended in windows of this size. Default 32768.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from tq_vllm.quant.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset

CONFIG_KEY = "tq_vllm"
EXACT = "bf16"  # boundary "preset" meaning: exact pages in the model dtype
KNOWN_KEYS = ("preset", "boundary_layers", "boundary_preset", "staging_slots", "sink_entries", "seed",
              "prefill_workspace_tokens")
DEFAULT_SINK_ENTRIES = 1024


class TQConfigError(ValueError):
    """A bad tq_vllm option; the message names the option, the problem and the fix."""


def _preset_or_error(value, what: str) -> Preset:
    try:
        return get_preset(value)
    except (ValueError, TypeError) as e:
        raise TQConfigError(f"tq_vllm: {what}={value!r} is invalid: {e}. Known presets: {', '.join(PRESETS)}; "
                            f"set it with --additional-config '{{\"tq_vllm\": {{\"{what}\": \"tq4\"}}}}'") from None


@dataclass(frozen=True)
class TQConfig:
    preset: Preset = field(default_factory=lambda: get_preset(DEFAULT_PRESET))
    boundary_first: int = 0
    boundary_last: int = 0
    boundary_preset: Preset | None = None  # None = exact (bf16) boundary pages
    staging_slots: int | None = None
    sink_entries: int = DEFAULT_SINK_ENTRIES
    seed: int = 0
    prefill_workspace_tokens: int | None = None
    raw: tuple = ()  # the user's dict, as sorted items (for logs and hashing)

    # ------------------------------------------------------------------------------------------- parsing
    @classmethod
    def from_dict(cls, d: dict | None) -> "TQConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - set(KNOWN_KEYS))
        if unknown:
            raise TQConfigError(f"tq_vllm: unknown option(s) {unknown} in additional_config['tq_vllm']; "
                                f"known options: {', '.join(KNOWN_KEYS)}")
        preset = _preset_or_error(d.get("preset", DEFAULT_PRESET), "preset")
        bl = d.get("boundary_layers", 0)
        if isinstance(bl, bool) or not (isinstance(bl, int) or (isinstance(bl, (list, tuple)) and len(bl) == 2
                                                                and all(isinstance(x, int) and not isinstance(x, bool)
                                                                        for x in bl))):
            raise TQConfigError(f"tq_vllm: boundary_layers={bl!r} must be an int N (first and last N layers) or a "
                                f"[first, last] pair of ints")
        first, last = (bl, bl) if isinstance(bl, int) else (int(bl[0]), int(bl[1]))
        if first < 0 or last < 0:
            raise TQConfigError(f"tq_vllm: boundary_layers={bl!r} must not be negative")
        bp_raw = d.get("boundary_preset", "tq8")
        if bp_raw in (EXACT, "bfloat16", "auto", "exact"):
            bp = None
        else:
            bp = _preset_or_error(bp_raw, "boundary_preset")
        if "boundary_preset" in d and first == last == 0:
            raise TQConfigError(f"tq_vllm: boundary_preset={bp_raw!r} is set but boundary_layers is 0, so no layer "
                                f"would use it; set boundary_layers (e.g. 2) or drop boundary_preset")
        slots = d.get("staging_slots")
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
            raise TQConfigError(f"tq_vllm: staging_slots={slots!r} must be a positive int (>= max_num_seqs)")
        sink = d.get("sink_entries", DEFAULT_SINK_ENTRIES)
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 1:
            raise TQConfigError(f"tq_vllm: sink_entries={sink!r} must be a positive int")
        seed = d.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TQConfigError(f"tq_vllm: seed={seed!r} must be an int")
        pws = d.get("prefill_workspace_tokens")
        if pws is not None and (isinstance(pws, bool) or not isinstance(pws, int) or pws < 256):
            raise TQConfigError(f"tq_vllm: prefill_workspace_tokens={pws!r} must be an int >= 256 (default 32768; "
                                f"smaller means more passes over long prefixes)")
        raw = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in d.items()))
        return cls(preset=preset, boundary_first=first, boundary_last=last, boundary_preset=bp,
                   staging_slots=slots, sink_entries=int(sink), seed=int(seed), prefill_workspace_tokens=pws, raw=raw)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "TQConfig":
        extra = getattr(vllm_config, "additional_config", None) or {}
        if not isinstance(extra, dict):
            extra = getattr(extra, "__dict__", {}) or {}
        d = extra.get(CONFIG_KEY)
        if isinstance(d, str):  # a JSON string (e.g. from an env var or a YAML scalar)
            try:
                d = json.loads(d)
            except ValueError as e:
                raise TQConfigError(f"tq_vllm: additional_config['tq_vllm'] is not valid JSON: {e}") from None
        if d is not None and not isinstance(d, dict):
            raise TQConfigError(f"tq_vllm: additional_config['tq_vllm'] must be a dict, got {type(d).__name__}")
        return cls.from_dict(d)

    # ------------------------------------------------------------------------------------------- queries
    @property
    def has_boundary(self) -> bool:
        return self.boundary_first > 0 or self.boundary_last > 0

    @property
    def boundary_name(self) -> str:
        return EXACT if self.boundary_preset is None else self.boundary_preset.name

    def is_boundary(self, layer_index: int | None, num_layers: int | None) -> bool:
        if layer_index is None or not self.has_boundary:
            return False
        if layer_index < self.boundary_first:
            return True
        return num_layers is not None and layer_index >= num_layers - self.boundary_last

    def check_layers(self, num_layers: int | None) -> None:
        if num_layers is not None and self.boundary_first + self.boundary_last > num_layers:
            raise TQConfigError(
                f"tq_vllm: boundary_layers=({self.boundary_first}, {self.boundary_last}) covers more than the "
                f"model's {num_layers} layers; use at most {num_layers // 2} per side")

    def num_staging_slots(self, max_num_seqs: int) -> int:
        if self.staging_slots is not None:
            if self.staging_slots < max_num_seqs:
                raise TQConfigError(
                    f"tq_vllm: staging_slots={self.staging_slots} is below max_num_seqs={max_num_seqs}: every running "
                    f"request needs one exact staging slot for its open block; raise staging_slots to at least "
                    f"{max_num_seqs + default_margin(max_num_seqs)} or lower --max-num-seqs")
            return self.staging_slots
        return max_num_seqs + default_margin(max_num_seqs)

    def describe(self) -> str:
        s = f"preset {self.preset.name}"
        if self.has_boundary:
            s += f", boundary layers first {self.boundary_first} / last {self.boundary_last} at {self.boundary_name}"
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"preset": dataclasses.asdict(self.preset), "boundary_layers": [self.boundary_first,
                                                                               self.boundary_last],
                "boundary_preset": self.boundary_name, "staging_slots": self.staging_slots,
                "sink_entries": self.sink_entries, "seed": self.seed,
                "prefill_workspace_tokens": self.prefill_workspace_tokens}


def default_margin(max_num_seqs: int) -> int:
    """Extra staging slots beyond max_num_seqs: LRU slack for requests that finish, are preempted or skip steps."""
    return max(8, max_num_seqs // 8)
