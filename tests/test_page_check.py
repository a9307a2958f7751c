"""The page certifier of the kernel tests (tests/page_check.py) accepts a code flipped at a tie and rejects every
other difference from the format's definition: built from the reference codec's own pages on fresh random inputs."""
import pytest
import torch

from page_check import certify_pages
from tq_vllm.quant.codec import LayerCodec


def _pages(codec, k, v, nb=3):
    """The reference's pages of one block (block id 1) in a poisoned cache."""
    H = k.shape[1]
    cache = torch.randint(0, 256, (nb, H, codec.block_size, codec.layout.bytes_per_token), dtype=torch.uint8)
    codec.write_pages(cache, torch.tensor([1]), codec.encode_blocks(k[None], v[None], first=torch.tensor([True])))
    return cache


def _tie_case(seed: int):
    """tq4 (values without a block mean), D 64, B 16: values whose token 3 has u exactly on a decision boundary at
    coordinate 5 (float64), and two float64 inputs a few fp32 ulps to either side of it."""
    g = torch.Generator().manual_seed(seed)
    codec = LayerCodec("tq4", 64, 16, layer_index=2)
    rot = codec.rot.double()
    k = torch.randn(16, 1, 64, generator=g, dtype=torch.float64)
    y = torch.randn(16, 1, 64, generator=g, dtype=torch.float64)
    t, i = 3, 5
    bnd = codec.bounds["v"].double()
    u = y[t, 0] / y[t, 0].norm()
    b = bnd[(bnd - u[i]).abs().argmin()]
    rest = (y[t, 0].pow(2).sum() - y[t, 0, i] ** 2).sqrt()
    y[t, 0, i] = b * rest / (1 - b * b).sqrt()  # u_i = b
    assert abs(y[t, 0, i] / y[t, 0].norm() - b) < 1e-15
    v = y @ rot  # x = y Π, so that x Π^T = y

    def nudged(rel):
        yn = y.clone()
        yn[t, 0, i] *= 1 + rel
        return yn @ rot
    return codec, k, v, nudged, (t, i)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certify_accepts_a_tie_and_rejects_a_flip_away_from_one(seed):
    codec, k, v, nudged, (t, i) = _tie_case(seed)
    above, below = _pages(codec, k, nudged(3e-7)), _pages(codec, k, nudged(-3e-7))
    ndiff, bad = certify_pages(codec, above, below, [1], k[None], v[None])
    assert ndiff > 0 and not bad, (ndiff, bad)  # the two sides of the tie code coordinate i differently
    codes = {n: codec._get_codes(codec.read_fields(c, torch.tensor([1])), "v")[0, 0, t, i].item()
             for n, c in (("above", above), ("below", below))}
    assert abs(codes["above"] - codes["below"]) == 1
    # the same pages certified against inputs 3e-3 to the other side of the boundary: away from a tie, rejected
    for page, other, rel in ((above, below, -3e-3), (below, above, 3e-3)):
        _, bad = certify_pages(codec, page, other, [1], k[None], nudged(rel)[None])
        assert any("codes differ from the definition away from a tie" in b for b in bad), bad


@pytest.mark.parametrize("preset", ["tq4", "tq3", "tq25", "tq4-prod"])
def test_certify_rejects_corrupted_pages(preset):
    g = torch.Generator().manual_seed(len(preset))
    codec = LayerCodec(preset, 64, 16, layer_index=1)
    k = torch.randn(16, 2, 64, generator=g) * 2 + 0.5
    v = torch.randn(16, 2, 64, generator=g)
    ref = _pages(codec, k, v)
    assert certify_pages(codec, ref.clone(), ref, [1], k[None], v[None]) == (0, [])
    pv = codec.page_view
    lay = codec.layout
    fields = ["k_codes0", "v_codes0", "k_scale", "v_scale"] + [n for n in ("k_mean0", "k_mean_scale", "v_mean0",
                                                                           "k_qjl", "k_rnorm") if n in lay.fields]
    for name in fields:
        f = lay.fields[name]
        bad_cache = ref.clone()
        # a low bit of a code byte, the exponent's low bit of a bf16 (the high byte of item 2, or of the only one)
        if "scale" in name or "rnorm" in name:
            off = f.offset + min(2, f.count - 1) * f.item_bytes + f.item_bytes - 1
        else:
            off = f.offset + min(5, f.item_bytes * f.count - 1)
        assert f.offset <= off < f.end
        pv(bad_cache)[1, 1, off] ^= 0x01
        ndiff, bad = certify_pages(codec, bad_cache, ref, [1], k[None], v[None])
        assert ndiff == 1 and bad, (name, bad)
    for off in ([lay.fields["sink_tag"].offset] if "sink_tag" in lay.fields else []) + \
            ([lay.used_bytes] if lay.page_bytes > lay.used_bytes else []):
        bad_cache = ref.clone()
        pv(bad_cache)[1, 0, off] ^= 0x80
        assert certify_pages(codec, bad_cache, ref, [1], k[None], v[None])[1]
