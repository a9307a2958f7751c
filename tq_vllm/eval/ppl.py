"""Perplexity of a text with the KV cache in a given format, under decode semantics.

Fast path (`engine="hf"`): transformers on CPU with the harness attention (attention.py), one forward pass per
window and format. In-engine path (`engine="vllm"`): prompt log-probabilities through a real vLLM engine with our
attention backend (our semantics are chunk-invariant, so prompt logprobs = decode semantics).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attention import DecodeSemanticsAttention, install, use
from .formats import KVFormat, make_format


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_model(model_dir: str | os.PathLike, dtype: str = "float32"):
    """(model, tokenizer) from a Hugging Face directory, on CPU, eval mode, harness attention installed."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    model.eval()
    install(model)
    return model, tok


def model_shape(model) -> dict:
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
            "num_kv_heads": c.num_key_value_heads, "head_dim": hd}


@dataclass
class Window:
    ids: list[int]
    title: str = ""


def text_windows(tok, text_path: str | os.PathLike, tokens: int, windows: int) -> list[Window]:
    """`windows` windows of exactly `tokens` tokens. If an article index (`<text>.json`, as written by
    `tq_vllm.assets.fetch_wikipedia`) lies beside the text, each window is the start of one article long enough
    (in file order); otherwise consecutive windows from the start of the file."""
    path = Path(text_path)
    text = path.read_text(encoding="utf-8")
    index = path.with_suffix(".json")
    out: list[Window] = []
    if index.exists():
        try:
            arts = json.loads(index.read_text(encoding="utf-8"))["articles"]
        except (ValueError, KeyError):
            arts = []
        for a in arts:
            if len(out) >= windows:
                break
            if a["chars"] < tokens * 3:  # cheap pre-filter (English ~4+ chars per token)
                continue
            ids = tok(text[a["start"]:a["end"]], add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                out.append(Window(ids[:tokens], a["title"]))
        if len(out) == windows:
            return out
        out = []
    need = tokens * windows
    chars = max(need * 6, 10_000)
    while True:
        ids = tok(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"{path} has only {len(ids)} tokens; need {windows} x {tokens}")
    return [Window(ids[i * tokens:(i + 1) * tokens], f"tokens {i * tokens}..{(i + 1) * tokens}")
            for i in range(windows)]


@torch.no_grad()
def window_nll(model, ids: list[int], session: DecodeSemanticsAttention, logit_chunk: int = 512) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over the window (len(ids)-1 predictions) and their count."""
    session.reset()
    x = torch.tensor([ids])
    with use(session):
        hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[0, :-1]
    tgt = x[0, 1:]
    total = 0.0
    for i in range(0, tgt.shape[0], logit_chunk):
        h = hidden[i:i + logit_chunk]
        logits = model.lm_head(h).float()
        total += float(torch.nn.functional.cross_entropy(logits, tgt[i:i + logit_chunk], reduction="sum"))
    session.reset()
    return total, int(tgt.shape[0])


@dataclass
class PplResult:
    fmt: str
    nll: float = 0.0
    count: int = 0
    per_window: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stats: list[dict] | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(self.count, 1))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="win", leave=False)


def ppl_hf(model, windows: list[Window], fmts: list[KVFormat | str], *, progress: bool = False,
           collect_stats: bool = False, kv_dtype: torch.dtype | None = torch.bfloat16) -> dict[str, PplResult]:
    """Perplexity of every format over the windows (fast path). Keys: the format specs."""
    shape = model_shape(model)
    results: dict[str, PplResult] = {}
    fmts = [make_format(f) if isinstance(f, str) else f for f in fmts]
    bar = _progress(len(fmts) * len(windows), "ppl", progress)
    for f in fmts:
        sess = DecodeSemanticsAttention(f, shape["num_layers"], kv_dtype=kv_dtype, collect_stats=collect_stats)
        r = PplResult(f.name)
        t0 = time.perf_counter()
        for w in windows:
            nll, cnt = window_nll(model, w.ids, sess)
            r.nll += nll
            r.count += cnt
            r.per_window.append(math.exp(nll / cnt))
            if bar is not None:
                bar.set_postfix_str(f.name)
                bar.update(1)
        r.seconds = time.perf_counter() - t0
        if collect_stats:
            r.stats = sess.layer_error_summary()
        results[f.name] = r
    if bar is not None:
        bar.close()
    return results


# ------------------------------------------------------------------------------------------------ vLLM engine
def vllm_kv_cache_dtype(fmt: KVFormat | str) -> str | None:
    """vLLM's own `kv_cache_dtype` for the harness formats that vLLM implements itself: ``fp8`` -> "fp8",
    ``vllm:<recipe>`` / ``turboquant_<recipe>`` -> "turboquant_<recipe>" (with vLLM's default attention backend);
    None for every other format. Raises ValueError for options vLLM cannot reproduce (sink blocks, boundary layers
    other than vLLM's own: none for fp8, the first and last 2 layers in bf16 for TurboQuant)."""
    from .formats import ExactFormat, Fp8Format, VllmFormat

    f = make_format(fmt) if isinstance(fmt, str) else fmt
    if isinstance(f.base, Fp8Format):
        dtype, boundary = "fp8", 0
    elif isinstance(f.base, VllmFormat):
        dtype, boundary = f"turboquant_{f.base.recipe}", 2
    else:
        return None
    if f.sink or f.sink_tok or f.boundary != boundary or not isinstance(f.boundary_fmt, ExactFormat):
        raise ValueError(f"{f.name!r}: vLLM's kv_cache_dtype={dtype} has no sink / boundary options (it keeps "
                         f"{boundary} boundary layers at each end in bf16); drop them for the vLLM engine")
    return dtype


def vllm_engine_kwargs(fmt: KVFormat | str | None, block_size: int | None = None) -> dict:
    """LLM(...) arguments for our backend in format `fmt` (None / "bf16": vLLM's own attention, bf16 KV).

    `fmt` is a tq_vllm preset (with preset-field overrides), optionally with boundary layers in bf16 or another
    preset, or one of the formats vLLM implements itself (``fp8``, ``vllm:4bit_nc`` = ``turboquant_4bit_nc``, ...:
    vLLM's `kv_cache_dtype` with its default backend, see `vllm_kv_cache_dtype`); sink blocks and the emulator
    (emu) do not exist in the engine."""
    kw: dict = {"enforce_eager": True, "max_num_seqs": 4, "seed": 0, "dtype": "bfloat16"}
    if fmt is None or fmt in ("bf16", "auto"):
        if block_size:
            kw["block_size"] = int(block_size)
        return kw
    from .formats import ExactFormat, TQFormat

    f = make_format(fmt) if isinstance(fmt, str) else fmt
    kv_dtype = vllm_kv_cache_dtype(f)
    if kv_dtype is not None:
        _check_platform_kv_dtype(kv_dtype)
        kw["kv_cache_dtype"] = kv_dtype
        if block_size:
            kw["block_size"] = int(block_size)
        return kw
    if not isinstance(f.base, TQFormat) or f.sink:
        raise ValueError(f"the vLLM engine runs tq_vllm presets only (optionally with boundary layers), not "
                         f"{f.name!r}")
    cfg: dict = {"preset": f.base.preset.to_dict(), "seed": f.base.seed}
    cfg["preset"].pop("description", None)
    if f.boundary:
        cfg["boundary_layers"] = f.boundary
        if isinstance(f.boundary_fmt, ExactFormat):
            cfg["boundary_preset"] = "bf16"
        elif isinstance(f.boundary_fmt, TQFormat):
            bp = f.boundary_fmt.preset.to_dict()
            bp.pop("description", None)
            cfg["boundary_preset"] = bp
        else:
            raise ValueError(f"boundary format {f.boundary_fmt.name!r} does not exist in the engine")
    kw["block_size"] = int(block_size or f.block_size)
    kw["attention_backend"] = "CUSTOM"
    kw["additional_config"] = {"tq_vllm": cfg}
    return kw


def _check_platform_kv_dtype(kv_dtype: str) -> None:
    """Fail early and clearly where vLLM's build cannot run this kv_cache_dtype (the CPU build has no TurboQuant
    cache; whether it takes fp8 depends on its attention backend, which says so itself)."""
    try:
        from vllm.platforms import current_platform
    except Exception:  # no vLLM here: LLM(...) will say so
        return
    if kv_dtype.startswith("turboquant_") and current_platform.is_cpu():
        raise ValueError(f"kv_cache_dtype={kv_dtype} (vLLM's own TurboQuant) needs vLLM's CUDA build; this is its "
                         f"CPU build. Use a GPU, or --engine hf (the harness re-implementation, spec vllm:"
                         f"{kv_dtype.removeprefix('turboquant_')})")


def _engine_env() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    _offline()


def close_engine(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    import gc

    del llm
    gc.collect()


def free_device_memory() -> None:
    """After the caller dropped its last reference to a closed engine: hand its device memory back, since the next
    engine of this process profiles the free memory when it starts."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prompts(list_of_ids):
    try:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=list(ids)) for ids in list_of_ids]
    except ImportError:
        return [{"prompt_token_ids": list(ids)} for ids in list_of_ids]


def ppl_vllm(model_dir: str, windows: list[Window], fmt: KVFormat | str | None, *, block_size: int | None = None,
             max_model_len: int | None = None, chunk: int | None = None) -> PplResult:
    """Perplexity from prompt logprobs of a real vLLM engine with our backend in format `fmt` (None / "bf16":
    vLLM's own attention). `chunk`: max_num_batched_tokens with chunked prefill (our semantics make the result
    chunk-invariant)."""
    _engine_env()
    from vllm import LLM, SamplingParams

    n = max(len(w.ids) for w in windows)
    kw = vllm_engine_kwargs(fmt, block_size)
    kw["max_model_len"] = max_model_len or n + 8
    if chunk:
        kw["enable_chunked_prefill"] = True
        kw["max_num_batched_tokens"] = int(chunk)
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), **kw)
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    name = fmt if isinstance(fmt, str) else (fmt.name if fmt is not None else "bf16")
    r = PplResult(name)
    try:
        outs = llm.generate(_prompts(w.ids for w in windows), sp, use_tqdm=False)
    finally:
        pass
    for w, o in zip(windows, outs):
        nll, cnt = 0.0, 0
        for tid, lp in zip(w.ids[1:], o.prompt_logprobs[1:]):
            nll -= lp[tid].logprob
            cnt += 1
        r.nll += nll
        r.count += cnt
        r.per_window.append(math.exp(nll / cnt))
    r.seconds = time.perf_counter() - t0
    close_engine(llm)
    del llm, outs
    free_device_memory()
    return r
