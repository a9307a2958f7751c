"""benchmarks/research_int8_query.py: its attention with the query left exact is the harness attention, and the
int8 rounding moves the output by about its own step."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import research_int8_query as R  # noqa: E402
from tq_vllm.eval.attention import DecodeSemanticsAttention  # noqa: E402


@pytest.mark.parametrize("preset,Tq,Tk,H,G,D", [("tq4", 70, 70, 2, 4, 64), ("tq3", 5, 133, 1, 1, 128),
                                              ("tq4", 1, 97, 2, 3, 64)])
def test_int8_query_attention(preset, Tq, Tk, H, G, D, monkeypatch):
    g = torch.Generator().manual_seed(Tk * 7 + Tq)
    q = torch.randn(Tq, H * G, D, generator=g)
    k = torch.randn(Tk, H, D, generator=g) * 2
    v = torch.randn(Tk, H, D, generator=g)
    ref = DecodeSemanticsAttention(preset, 2).attend(1, q, k, v, D ** -0.5)
    got8 = R.Int8QueryAttention(preset, 2).attend(1, q, k, v, D ** -0.5)
    got8p = R.Int8QueryAttention(preset, 2, p_int8=True).attend(1, q, k, v, D ** -0.5)
    dp = (got8p - got8).abs().max()
    assert 0 < dp < 0.05, dp  # P rounding moves the rows that read coded keys, and not much
    monkeypatch.setattr(R, "int8_roundtrip", lambda x: x)
    got = R.Int8QueryAttention(preset, 2).attend(1, q, k, v, D ** -0.5)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (got - ref).abs().max()
    d8 = (got8 - ref).abs().max()
    assert 0 < d8 < 0.05, d8  # the rounding is seen, and it is small
    if Tq == Tk:  # the queries of the first block read no coded key: the same as with the exact query
        B = R.Int8QueryAttention(preset, 2).fmt.layer(1, 2).block_size
        assert torch.allclose(got8[:B], got[:B], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got8[B:], got[B:], rtol=1e-5, atol=1e-6)
