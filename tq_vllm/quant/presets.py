"""Named presets: which bits, modes and tricks a KV cache format uses. The page layout derives from these."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODES = ("mse", "prod")
SCALES = ("ls", "norm")
ROTATIONS = ("hadamard", "qr")


@dataclass(frozen=True)
class Preset:
    """A KV format. `k_bits`/`v_bits` are the total bits per coordinate (for "prod" keys: k_bits-1 of Lloyd–Max
    codes + 1 QJL sign bit). `k_center`/`v_center` subtract the block mean (coded at `mean_bits`) first."""

    name: str
    k_bits: int
    v_bits: int
    k_mode: str = "mse"
    k_center: bool = True
    v_center: bool = False
    mean_bits: int = 3
    scale: str = "ls"
    rotation: str = "hadamard"
    sink: bool = True
    description: str = ""

    def __post_init__(self):
        for what, b in (("k_bits", self.k_bits), ("v_bits", self.v_bits), ("mean_bits", self.mean_bits)):
            if not 1 <= int(b) <= 8:
                raise ValueError(f"preset {self.name!r}: {what}={b} must be between 1 and 8")
        if self.k_mode not in MODES:
            raise ValueError(f"preset {self.name!r}: k_mode={self.k_mode!r}; choose one of {MODES}")
        if self.k_mode == "prod" and self.k_bits < 2:
            raise ValueError(f"preset {self.name!r}: 'prod' keys need k_bits >= 2 (k_bits-1 Lloyd–Max bits + 1 QJL bit)")
        if self.scale not in SCALES:
            raise ValueError(f"preset {self.name!r}: scale={self.scale!r}; choose one of {SCALES}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"preset {self.name!r}: rotation={self.rotation!r}; choose one of {ROTATIONS}")

    @property
    def k_code_bits(self) -> int:
        """Lloyd–Max bits of the key codes (k_bits, or k_bits-1 for "prod")."""
        return self.k_bits - 1 if self.k_mode == "prod" else self.k_bits

    def replace(self, **kw) -> "Preset":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tq4", 4, 4, description="4-bit K and V, key block-mean; the default"),
        # tq3: key block-mean only (measured, docs/quality.md: with token 0 exact the value mean bought nothing,
        # +1.06 % with it vs +0.92 % without on two rotation seeds, and cost 2 B/token/head at d=128: 104 -> 102)
        Preset("tq3", 3, 3, description="3-bit K and V, key block-mean"),
        Preset("tq35", 4, 3, v_center=True, description="4-bit K, 3-bit V (3.5 bits average)"),
        Preset("tq25", 3, 2, v_center=True, description="3-bit K, 2-bit V (2.5 bits average)"),
        Preset("tq4-prod", 4, 4, k_mode="prod", k_center=False,
               description="paper's TurboQuant_prod keys (3-bit codes + 1-bit QJL), 4-bit V"),
        Preset("tq8", 8, 8, k_center=False, description="8-bit K and V: high precision, for boundary layers and checks"),
    )
}
DEFAULT_PRESET = "tq4"


def get_preset(name_or_preset, **overrides) -> Preset:
    """A preset by name (or a Preset / dict of fields), with field overrides. Unknown names raise with the list."""
    if isinstance(name_or_preset, Preset):
        p = name_or_preset
    elif isinstance(name_or_preset, dict):
        d = dict(name_or_preset)
        base = d.pop("base", None)
        p = get_preset(base) if base else None
        if p is None:
            return Preset(**{"name": d.pop("name", "custom"), **d}).replace(**overrides)
        return p.replace(**{"name": d.pop("name", p.name), **d}, **overrides)
    else:
        name = str(name_or_preset)
        if name not in PRESETS:
            raise ValueError(f"unknown tq_vllm preset {name!r}; known presets: {', '.join(PRESETS)} "
                             f"(see `tq-vllm presets`)")
        p = PRESETS[name]
    return p.replace(**overrides) if overrides else p


def print_presets_table(head_dims=(64, 128), block_size: int = 32, file=None) -> None:
    """The `tq-vllm presets` table: bits, modes, exact bytes per token per KV head, compression vs bf16."""
    from .layout import PageLayout

    rows = []
    for p in PRESETS.values():
        cols = [p.name, f"{p.k_bits}{'(3+QJL)' if p.k_mode == 'prod' else ''}/{p.v_bits}",
                ("K" if p.k_center else "") + ("V" if p.v_center else "") or "-"]
        for d in head_dims:
            lay = PageLayout(p, d, block_size)
            cols += [str(lay.bytes_per_token), f"{4 * d / lay.bytes_per_token:.2f}x"]
        cols.append(p.description)
        rows.append(cols)
    hdr = ["preset", "K/V bits", "mean"]
    for d in head_dims:
        hdr += [f"B/tok/head d={d}", f"vs bf16 d={d}"]
    hdr.append("description")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(hdr)]
    line = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
    print(f"tq_vllm presets (block_size {block_size}; bf16 = {4} bytes x head_dim per token per KV head)", file=file)
    print(line(hdr), file=file)
    print(line(["-" * w for w in widths]), file=file)
    for r in rows:
        print(line(r), file=file)
