"""KV cache formats for the quality harness: ours (the real `LayerCodec`), bf16, fp8, vLLM's TurboQuant recipes and
an emulator for research variants that our page format does not (yet) have.

A *layer format* quantizes-and-dequantizes (qdq) the K/V of one layer and says when a query sees the quantized
version ("semantics"):

* ``exact``: the model's K/V (bf16-rounded), i.e. the bf16 baseline;
* ``token``: every token is quantized as soon as it is written; query p reads quantized K/V of all j <= p
  (vLLM's TurboQuant and fp8 caches in decode);
* ``block``: our format: block b (B tokens) is quantized once full; query p reads blocks before its own block
  quantized and its own block exact (docs/design.md).

A `KVFormat` is the whole-model format: one layer format, optional *boundary* layers (the first and last n layers)
in another format (exact bf16 by default, like vLLM's skip layers), and optional *sink* blocks (the first blocks
kept exact: not in our page format, measured to see what it would buy).

Spec strings (CLI `--preset`, benchmarks):
    bf16 | fp8 | vllm:4bit_nc | vllm:k8v4 | vllm:k3v4_nc | vllm:3bit_nc | tq4 | tq3 | ... (any tq_vllm preset)
    | emu[:knobs]
followed by `:key=value,key=value` options. Options for every format: ``block`` (block size, default 32),
``sink_blocks`` / ``sink_tok`` (exact leading blocks / tokens; the presets' own ``sink`` field keeps token 0
exact like the backend's sink table), ``sink_kv`` (k | v | kv: which of them the sink options keep exact), ``boundary`` (layers at each end in ``boundary_fmt``, default exact bf16; vLLM
recipes default to boundary=2 like vLLM), ``boundary_fmt``, ``seed``. Other keys are preset fields for tq presets
(k_bits, v_bits, k_mode, k_center, v_center, mean_bits, scale, rotation) or emulator knobs (see `EmuFormat`).
Example: ``tq4:mean_bits=4,block=64``, ``emu:k_scale=nc,v_quant=uniform,v_rot=0``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from tq_vllm.quant.codebook import boundaries as lm_boundaries
from tq_vllm.quant.codebook import codebook as lm_codebook
from tq_vllm.quant.codebook import page_codebook
from tq_vllm.quant.codec import LayerCodec, bf16_round, encode_dir, robust_norm
from tq_vllm.quant.layout import PageLayout
from tq_vllm.quant.presets import PRESETS, Preset, get_preset
from tq_vllm.quant.rotation import layer_seed, rotation

from .vllm_recipe import RECIPES, VllmTurboQuant, boundary_skip_layers, fp8_round, fp16_round, plain_hadamard

DEFAULT_BLOCK_SIZE = 32


class LayerFormat:
    """How one layer stores K/V. `qdq(layer, k, v)`: block semantics: k, v `[N, B, H, D]` (full blocks);
    token semantics: `[T, H, D]`. Returns float32 tensors of the same shape in the original domain."""

    name = "?"
    semantics = "exact"
    block_size = DEFAULT_BLOCK_SIZE

    def qdq(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return k.to(torch.float32), v.to(torch.float32)

    def bytes_per_token(self, head_dim: int) -> int:
        """Exact bytes per token per KV head (K and V together) of this layer's cache."""
        return 4 * head_dim  # bf16 K + V


class ExactFormat(LayerFormat):
    name = "bf16"


class Fp8Format(LayerFormat):
    """fp8 e4m3 per-tensor with scale 1 (vLLM's `--kv-cache-dtype fp8` without calibration), every token at once."""

    name = "fp8"
    semantics = "token"

    def qdq(self, layer, k, v):
        return fp8_round(k.to(torch.float32)), fp8_round(v.to(torch.float32))

    def bytes_per_token(self, head_dim):
        return 2 * head_dim


class VllmFormat(LayerFormat):
    """vLLM 0.26's TurboQuant recipe (see vllm_recipe.py), every token quantized at once."""

    semantics = "token"

    def __init__(self, recipe: str):
        self.recipe = recipe
        self.name = f"vllm:{recipe}"
        self._q: dict[int, VllmTurboQuant] = {}

    def _quant(self, D):
        if D not in self._q:
            self._q[D] = VllmTurboQuant(self.recipe, D)
        return self._q[D]

    def qdq(self, layer, k, v):
        return self._quant(k.shape[-1]).qdq(k, v)

    def bytes_per_token(self, head_dim):
        return self._quant(head_dim).slot_size_aligned


class TQFormat(LayerFormat):
    """Our page format through the real codec (`LayerCodec.encode_blocks` / `decode_fields`)."""

    semantics = "block"

    def __init__(self, preset: Preset, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0):
        self.preset, self.block_size, self.seed = preset, int(block_size), int(seed)
        self.name = preset.name
        self._codecs: dict[tuple[int, int], LayerCodec] = {}

    def codec(self, layer: int, head_dim: int) -> LayerCodec:
        key = (layer, head_dim)
        if key not in self._codecs:
            self._codecs[key] = LayerCodec(self.preset, head_dim, self.block_size, layer_index=layer, seed=self.seed)
        return self._codecs[key]

    def qdq(self, layer, k, v):
        codec = self.codec(layer, k.shape[-1])
        fields = codec.encode_blocks(k, v)
        kh = codec.unrotate(codec.decode_fields(fields, "k").permute(0, 2, 1, 3))
        vh = codec.unrotate(codec.decode_fields(fields, "v").permute(0, 2, 1, 3))
        return kh, vh

    def bytes_per_token(self, head_dim):
        return PageLayout(self.preset, head_dim, self.block_size).bytes_per_token


# ------------------------------------------------------------------------------------------------ emulator
@dataclasses.dataclass
class EmuKnobs:
    """Knobs of the research emulator (float math, no packing). Defaults = the tq4 preset.

    k_quant / v_quant: lm (rotated Lloyd–Max, the TurboQuant codebook) | uniform (per-vector min/max, fp16
        scale + zero, like vLLM's values) | fp8 | exact
    k_bits / v_bits: bits of the codes (outlier channels excepted)
    k_scale / v_scale: ls (least squares) | norm (paper: ‖y‖) | nc (norm / ‖c‖: the dequantized vector's norm is
        the original norm, vLLM's "norm correction")
    k_rot / v_rot: rotate before coding (1/0); rot: hadamard (signed) | hadamard_nosign | qr | none;
        rot_per: layer | head (a rotation per (layer, KV head))
    k_center / v_center: none | q (block mean coded at mean_bits, LS scale) | exact (bf16 block mean)
    k_out / v_out: number of outlier channels (largest RMS per (layer, head) over the first data seen, pre-rotation)
        coded with their own rotation at k_out_bits / v_out_bits; the rest at k_bits / v_bits (the paper's
        non-integer bit splits)
    """

    k_quant: str = "lm"
    v_quant: str = "lm"
    k_bits: int = 4
    v_bits: int = 4
    k_scale: str = "ls"
    v_scale: str = "ls"
    k_rot: bool = True
    v_rot: bool = True
    rot: str = "hadamard"
    rot_per: str = "layer"
    k_center: str = "q"
    v_center: str = "none"
    mean_bits: int = 3
    k_out: int = 0
    k_out_bits: int = 0
    v_out: int = 0
    v_out_bits: int = 0
    sem: str = "block"
    sink: bool = True  # token 0 exact through the backend's sink table (8-byte tag per block), like the presets

    def __post_init__(self):
        for kv in ("k", "v"):
            q, s, c = getattr(self, f"{kv}_quant"), getattr(self, f"{kv}_scale"), getattr(self, f"{kv}_center")
            if q not in ("lm", "uniform", "fp8", "exact"):
                raise ValueError(f"{kv}_quant={q!r}: lm | uniform | fp8 | exact")
            if s not in ("ls", "norm", "nc"):
                raise ValueError(f"{kv}_scale={s!r}: ls | norm | nc")
            if c not in ("none", "q", "exact"):
                raise ValueError(f"{kv}_center={c!r}: none | q | exact")
        if self.rot not in ("hadamard", "hadamard_nosign", "qr", "none"):
            raise ValueError(f"rot={self.rot!r}")
        if self.rot_per not in ("layer", "head"):
            raise ValueError(f"rot_per={self.rot_per!r}")
        if self.sem not in ("block", "token"):
            raise ValueError(f"sem={self.sem!r}")
        if self.sem == "token" and (self.k_center != "none" or self.v_center != "none"):
            raise ValueError("block-mean centering needs block semantics")


def _bits_bytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


@functools.lru_cache(maxsize=None)
def _emu_rotation(d: int, seed: int, kind: str) -> torch.Tensor:
    if kind == "none":
        return torch.eye(d)
    if kind == "hadamard_nosign":
        if d & (d - 1):
            return rotation(d, seed, "qr")
        return plain_hadamard(d)
    return rotation(d, seed, kind)


class EmuFormat(LayerFormat):
    """Research emulator: see `EmuKnobs`. With default knobs it reproduces the tq4 preset's math (tested)."""

    def __init__(self, knobs: EmuKnobs, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0, name: str = "emu"):
        self.k, self.block_size, self.seed, self.name = knobs, int(block_size), int(seed), name
        self.semantics = knobs.sem
        self._outliers: dict[tuple[int, str], torch.Tensor] = {}

    # rotation of group g of (layer, head) -> [H, d, d] (one per head, identical if rot_per == layer)
    def _rots(self, layer: int, kind_idx: int, d: int, H: int) -> torch.Tensor:
        base = layer_seed(self.seed, layer) + 104_729 * kind_idx
        if self.k.rot_per == "layer" or self.k.rot in ("none", "hadamard_nosign"):
            r = _emu_rotation(d, base, self.k.rot)
            return r[None].expand(H, d, d)
        return torch.stack([_emu_rotation(d, base + 15_485_863 * (h + 1), self.k.rot) for h in range(H)])

    def _groups(self, layer: int, kv: str, x: torch.Tensor):
        """[(channel index tensor, bits)] for kind kv. x: [..., H, D]."""
        D = x.shape[-1]
        n_out, b_out = getattr(self.k, f"{kv}_out"), getattr(self.k, f"{kv}_out_bits")
        bits = getattr(self.k, f"{kv}_bits")
        if not n_out:
            return None, [(None, bits)]
        key = (layer, kv)
        if key not in self._outliers:
            H = x.shape[-2]
            rms = x.reshape(-1, H, D).to(torch.float32).pow(2).mean(0)  # [H, D]
            self._outliers[key] = rms.argsort(-1, descending=True)  # [H, D] channel order per head
        order = self._outliers[key]
        return order, [(order[:, :n_out], b_out), (order[:, n_out:], bits)]

    def _code(self, y: torch.Tensor, bits: int, quant: str, scale: str) -> torch.Tensor:
        """qdq of (possibly rotated) vectors y [..., d] in float32."""
        d = y.shape[-1]
        if quant == "exact":
            return bf16_round(y)
        if quant == "fp8":
            return fp8_round(y)
        if quant == "uniform":
            levels = (1 << bits) - 1
            lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
            s = ((hi - lo) / levels).clamp_min(1e-8)
            q = ((y - lo) / s + 0.5).floor().clamp(0, levels)
            return q * fp16_round(s) + fp16_round(lo)
        c, b = page_codebook(d, bits, "k")  # the codec's K/V codebook (grid-rounded Lloyd–Max at <= 4 bits)
        if scale == "nc":
            codes, _ = encode_dir(y, c, b, "norm")
            cv = c[codes]
            s = bf16_round(robust_norm(y)) / cv.norm(dim=-1).clamp_min(1e-30)
            return s[..., None] * cv
        codes, s = encode_dir(y, c, b, scale)
        return s[..., None] * c[codes]

    def _qdq_kind(self, layer: int, kv: str, x: torch.Tensor, kind_idx: int) -> torch.Tensor:
        kn = self.k
        quant, scale = getattr(kn, f"{kv}_quant"), getattr(kn, f"{kv}_scale")
        center, do_rot = getattr(kn, f"{kv}_center"), getattr(kn, f"{kv}_rot")
        x = x.to(torch.float32)
        if quant == "exact" and center == "none":
            return x
        H, D = x.shape[-2], x.shape[-1]
        order, groups = self._groups(layer, kv, x)
        if order is None:
            # one group: follow the codec's order of operations (rotate, then center in the rotated domain)
            # the same rotation for K and V, like the codec (one Π per layer)
            R = self._rots(layer, 0, D, H) if do_rot else torch.eye(D)[None].expand(H, D, D)
            y = torch.einsum("...hd,hed->...he", x, R)
            mhat = self._center(y, center, R, rotated=True)
            yq = self._code(y - mhat, groups[0][1], quant, scale) + mhat
            return torch.einsum("...he,hed->...hd", yq, R)
        mhat = self._center(x, center, self._rots(layer, 50 + kind_idx, D, H), rotated=False)
        r = x - mhat
        out = torch.zeros_like(x)
        for gi, (idx, bits) in enumerate(groups):
            d = idx.shape[-1]
            xs = torch.stack([r[..., h, idx[h]] for h in range(H)], -2)  # [..., H, d]
            R = self._rots(layer, kind_idx * 7 + gi + 1, d, H) if do_rot else torch.eye(d)[None].expand(H, d, d)
            y = torch.einsum("...hd,hed->...he", xs, R)
            xq = torch.einsum("...he,hed->...hd", self._code(y, bits, quant, scale), R)
            for h in range(H):
                out[..., h, idx[h]] = xq[..., h, :]
        return out + mhat

    def _center(self, y, center, R, rotated):
        if center == "none":
            return torch.zeros_like(y[:, :1]) if y.dim() == 4 else torch.zeros_like(y)
        m = y.mean(dim=1, keepdim=True)  # [N, 1, H, D]
        if center == "exact":
            return bf16_round(m)
        D = y.shape[-1]
        if rotated:
            c, b = lm_codebook(D, self.k.mean_bits), lm_boundaries(D, self.k.mean_bits)
            codes, s = encode_dir(m, c, b, "ls")
            return s[..., None] * c[codes]
        # original domain (outlier split): code the mean with a full-dimension rotation R
        Rm = R
        ym = torch.einsum("...hd,hed->...he", m, Rm)
        c, b = lm_codebook(D, self.k.mean_bits), lm_boundaries(D, self.k.mean_bits)
        codes, s = encode_dir(ym, c, b, "ls")
        return torch.einsum("...he,hed->...hd", s[..., None] * c[codes], Rm)

    def qdq(self, layer, k, v):
        return self._qdq_kind(layer, "k", k, 0), self._qdq_kind(layer, "v", v, 1)

    def _vec_bytes(self, kv: str, D: int) -> int:
        kn = self.k
        quant = getattr(kn, f"{kv}_quant")
        if quant == "exact":
            return 2 * D
        if quant == "fp8":
            return D
        per_scale = 4 if quant == "uniform" else 2
        n_out, b_out, bits = getattr(kn, f"{kv}_out"), getattr(kn, f"{kv}_out_bits"), getattr(kn, f"{kv}_bits")
        groups = [(n_out, b_out), (D - n_out, bits)] if n_out else [(D, bits)]
        return sum(_bits_bytes(d, b) + per_scale for d, b in groups)

    def bytes_per_token(self, head_dim):
        D, B = head_dim, self.block_size
        per_tok = self._vec_bytes("k", D) + self._vec_bytes("v", D)
        per_block = 0
        for kv in ("k", "v"):
            c = getattr(self.k, f"{kv}_center")
            per_block += {"none": 0, "q": _bits_bytes(D, self.k.mean_bits) + 2, "exact": 2 * D}[c]
        if self.semantics == "token":
            return per_tok
        if self.k.sink:
            per_block += 8
        return math.ceil((per_tok * B + per_block) / B)


# ------------------------------------------------------------------------------------------------ model format
class KVFormat:
    """A whole-model KV format: `base` in every layer except `boundary` layers at each end (in `boundary_fmt`,
    exact bf16 by default); the first `sink` blocks (of `base.block_size` tokens) kept exact."""

    def __init__(self, base: LayerFormat, *, boundary: int = 0, boundary_fmt: LayerFormat | None = None,
                 sink: int = 0, sink_tok: int = 0, sink_kv: str = "kv", spec: str | None = None):
        self.base, self.boundary, self.sink = base, int(boundary), int(sink)
        self.sink_tok, self.sink_kv = int(sink_tok), sink_kv
        if sink_kv not in ("kv", "k", "v"):
            raise ValueError(f"sink_kv={sink_kv!r}: kv | k | v")
        self.boundary_fmt = boundary_fmt or ExactFormat()
        if self.boundary and self.boundary_fmt.semantics == "block" and \
                self.boundary_fmt.block_size != base.block_size:
            raise ValueError("boundary_fmt must use the same block size")
        self.spec = spec or base.name

    def sink_tokens(self) -> int:
        """Leading positions kept exact: sink blocks, sink tokens, or token 0 for presets with `sink` (the
        backend's exact sink table; docs/design.md)."""
        preset_sink = 1 if (getattr(getattr(self.base, "preset", None), "sink", False)
                            or getattr(getattr(self.base, "k", None), "sink", False)) else 0
        return max(self.sink * self.base.block_size, self.sink_tok, preset_sink)

    @property
    def name(self) -> str:
        return self.spec

    @property
    def block_size(self) -> int:
        return self.base.block_size

    def boundary_layers(self, num_layers: int) -> list[int]:
        return boundary_skip_layers(num_layers, self.boundary)

    def layer(self, idx: int, num_layers: int) -> LayerFormat:
        return self.boundary_fmt if idx in self.boundary_layers(num_layers) else self.base

    def bytes_per_token_head(self, head_dim: int, num_layers: int | None = None) -> float:
        """Bytes per token per KV head, averaged over the layers (boundary layers included)."""
        b = self.base.bytes_per_token(head_dim)
        if not num_layers or not self.boundary:
            return float(b)
        nb = len(self.boundary_layers(num_layers))
        return ((num_layers - nb) * b + nb * self.boundary_fmt.bytes_per_token(head_dim)) / num_layers

    def layer_bytes(self, head_dim: int) -> int:
        return self.base.bytes_per_token(head_dim)

    def __repr__(self):
        return f"KVFormat({self.spec!r})"


_GENERIC = ("block", "sink_blocks", "sink_tok", "sink_kv", "boundary", "boundary_fmt", "seed")


def _parse_value(raw: str, like):
    raw = raw.strip()
    if isinstance(like, bool):
        if raw.lower() in ("1", "true", "on", "yes", "y"):
            return True
        if raw.lower() in ("0", "false", "off", "no", "n"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if isinstance(like, int):
        return int(raw)
    if isinstance(like, float):
        return float(raw)
    return raw


def _split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'name:a=1,b=2' -> ('name', {'a': '1', 'b': '2'}); 'vllm:4bit_nc:sink=1' -> ('vllm:4bit_nc', {...})."""
    parts = spec.split(":")
    name, opts = parts[0], {}
    rest = parts[1:]
    if name == "vllm" and rest and "=" not in rest[0]:
        name = f"vllm:{rest[0]}"
        rest = rest[1:]
    for chunk in rest:
        for kv in filter(None, chunk.split(",")):
            if "=" not in kv:
                raise ValueError(f"bad option {kv!r} in KV format spec {spec!r} (want key=value)")
            key, val = kv.split("=", 1)
            opts[key.strip()] = val.strip()
    return name, opts


def make_layer_format(name: str, opts: dict[str, str], block_size: int, seed: int) -> LayerFormat:
    if name in ("bf16", "exact", "auto"):
        if opts:
            raise ValueError(f"{name} takes no options: {opts}")
        return ExactFormat()
    if name == "fp8":
        if opts:
            raise ValueError(f"fp8 takes no options: {opts}")
        return Fp8Format()
    if name.startswith("vllm:") or name.startswith("turboquant_"):
        if opts:
            raise ValueError(f"vLLM recipes take no options besides {_GENERIC}: {opts}")
        from .vllm_recipe import recipe_name

        return VllmFormat(recipe_name(name))
    if name == "emu":
        defaults = EmuKnobs()
        kw = {}
        for key, val in opts.items():
            if not hasattr(defaults, key):
                raise ValueError(f"unknown emulator knob {key!r}; known: {[f.name for f in dataclasses.fields(EmuKnobs)]}")
            kw[key] = _parse_value(val, getattr(defaults, key))
        return EmuFormat(EmuKnobs(**kw), block_size, seed)
    if name in PRESETS:
        base = get_preset(name)
        kw = {}
        for key, val in opts.items():
            if not hasattr(base, key) or key == "name":
                raise ValueError(f"unknown preset field {key!r} for {name}")
            kw[key] = _parse_value(val, getattr(base, key))
        p = base.replace(**kw) if kw else base
        return TQFormat(p, block_size, seed)
    known = ["bf16", "fp8", *(f"vllm:{r}" for r in RECIPES), *PRESETS, "emu"]
    raise ValueError(f"unknown KV format {name!r}; known: {', '.join(known)}")


def make_format(spec: str, *, block_size: int | None = None, seed: int = 0) -> KVFormat:
    """Parse a KV format spec (see module doc) into a `KVFormat`."""
    name, opts = _split_spec(spec)
    bs = int(opts.pop("block", block_size or DEFAULT_BLOCK_SIZE))
    seed = int(opts.pop("seed", seed))
    sink = int(opts.pop("sink_blocks", 0))
    sink_tok = int(opts.pop("sink_tok", 0))
    sink_kv = opts.pop("sink_kv", "kv")
    default_boundary = 2 if name.startswith("vllm:") or name.startswith("turboquant_") else 0
    boundary = int(opts.pop("boundary", default_boundary))
    bfmt_name = opts.pop("boundary_fmt", None)
    base = make_layer_format(name, opts, bs, seed)
    bfmt = None
    if bfmt_name:
        bname, bopts = _split_spec(bfmt_name.replace(";", ","))
        bfmt = make_layer_format(bname, bopts, bs, seed)
    return KVFormat(base, boundary=boundary, boundary_fmt=bfmt, sink=sink, sink_tok=sink_tok, sink_kv=sink_kv,
                    spec=spec)
