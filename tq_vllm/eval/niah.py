"""Needle in a haystack: a number hidden at a given depth of real Wikipedia text, asked for through the chat
template, answered greedily.

Engines: ``vllm`` (a real vLLM engine with our attention backend: the product path) and ``hf`` (transformers with
the decode-semantics harness attention: any format of the harness, e.g. vLLM's TurboQuant recipes or fp8, which
the CPU build of vLLM cannot run).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass

import torch

NEEDLE_VALUE = "73914"
NEEDLE = f"The secret number is {NEEDLE_VALUE}. Remember it: the secret number is {NEEDLE_VALUE}."
QUESTION = "What is the secret number in the text above? Reply with the number only."
# prompt styles: "end" = text, then the question; "both" = the task stated before the text too (as NIAH suites put
# it in the system prompt), which a small model needs to keep the needle in view over long haystacks
INSTRUCTION = "Somewhere in the following text there is a secret number. Read the text and remember the number."
PROMPT_STYLES = ("end", "both")
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)


@dataclass
class NiahCase:
    context: int  # requested prompt length in tokens
    depth: float
    prompt_ids: list[int]
    needle_token: int  # token position where the needle starts


@dataclass
class NiahResult:
    context: int
    prompt_tokens: int
    depth: float
    found: bool
    answer: str
    seconds: float

    def to_dict(self):
        return asdict(self)


def haystack_text(text_path: str | os.PathLike, skip_articles: int = 0) -> str:
    """Plain Wikipedia text to hide the needle in (articles of the sample, in file order)."""
    from pathlib import Path
    import json

    path = Path(text_path)
    text = path.read_text(encoding="utf-8")
    index = path.with_suffix(".json")
    if skip_articles and index.exists():
        arts = json.loads(index.read_text(encoding="utf-8"))["articles"]
        if skip_articles < len(arts):
            text = text[arts[skip_articles]["start"]:]
    return text


def _chat_ids(tok, user: str) -> list[int]:
    if not getattr(tok, "chat_template", None):  # a base model: a plain prompt
        return list(tok(f"{user}\nAnswer:", add_special_tokens=True)["input_ids"])
    msgs = [{"role": "user", "content": user}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def build_case(tok, hay_ids: list[int], context: int, depth: float, style: str = "end") -> NiahCase:
    """A prompt of ~`context` tokens: haystack tokens cut at a sentence end near `depth`, the needle, the rest,
    then the question, all in one user turn of the chat template."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r}: choose one of {PROMPT_STYLES}")
    head = INSTRUCTION + "\n\n" if style == "both" else ""
    overhead = len(_chat_ids(tok, head + "\n\n" + QUESTION)) + len(tok(" " + NEEDLE, add_special_tokens=False)["input_ids"])
    budget = context - overhead - 4
    if budget < 16:
        raise ValueError(f"context {context} too small")
    if len(hay_ids) < budget:
        raise ValueError(f"haystack has only {len(hay_ids)} tokens, need {budget}")
    hay = tok.decode(hay_ids[:budget])
    cut = int(len(hay) * depth)
    # move the cut to the next sentence end so the needle is a sentence of its own
    m = re.search(r"[.!?]\s", hay[cut:])
    cut = cut + m.end() if m and cut + m.end() < len(hay) else cut
    before, after = hay[:cut], hay[cut:]
    doc = before.rstrip() + " " + NEEDLE + " " + after.lstrip()
    ids = _chat_ids(tok, head + doc + "\n\n" + QUESTION)
    pre = _chat_ids(tok, head + before.rstrip())
    return NiahCase(context, depth, ids, max(0, len(pre) - 5))


def make_cases(tok, text_path, contexts, depths=DEFAULT_DEPTHS, style: str = "end") -> list[NiahCase]:
    hay = haystack_text(text_path)
    need = max(contexts) * 6
    hay_ids = tok(hay[:need], add_special_tokens=False)["input_ids"]
    return [build_case(tok, hay_ids, c, d, style) for c in contexts for d in depths]


def _found(answer: str) -> bool:
    return NEEDLE_VALUE in answer.replace(",", "").replace(" ", "")


# ------------------------------------------------------------------------------------------------ engines
@torch.no_grad()
def run_hf(model, tok, cases: list[NiahCase], fmt, *, max_new_tokens: int = 32, progress: bool = False):
    """Greedy answers with the harness attention in format `fmt` (prefill in one pass, then token by token)."""
    from .attention import DecodeSemanticsAttention, use
    from .formats import make_format
    from .ppl import _progress, model_shape

    fmt = make_format(fmt) if isinstance(fmt, str) else fmt
    sess = DecodeSemanticsAttention(fmt, model_shape(model)["num_layers"])
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    out = []
    bar = _progress(len(cases), "niah", progress)
    for case in cases:
        t0 = time.perf_counter()
        sess.reset()
        from transformers import DynamicCache

        cache = DynamicCache()
        gen: list[int] = []
        x = torch.tensor([case.prompt_ids])
        with use(sess):
            for _ in range(max_new_tokens):
                o = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = o.past_key_values
                nxt = int(o.logits[0, -1].argmax())
                if nxt in eos:
                    break
                gen.append(nxt)
                x = torch.tensor([[nxt]])
        ans = tok.decode(gen, skip_special_tokens=True)
        out.append(NiahResult(case.context, len(case.prompt_ids), case.depth, _found(ans), ans.strip(),
                              time.perf_counter() - t0))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    sess.reset()
    return out


def run_vllm(model_dir: str, cases: list[NiahCase], fmt, *, max_new_tokens: int = 32,
             block_size: int | None = None, max_num_batched_tokens: int | None = None):
    """Greedy answers from a real vLLM engine (our backend in format `fmt`, or vLLM's own bf16 attention for
    None / "bf16"), all cases in one batch. Returns (results, engine start seconds, generate seconds)."""
    from .ppl import _engine_env, _prompts, close_engine, free_device_memory, vllm_engine_kwargs

    _engine_env()
    from vllm import LLM, SamplingParams

    kw = vllm_engine_kwargs(fmt, block_size)
    kw["max_model_len"] = max(len(c.prompt_ids) for c in cases) + max_new_tokens + 8
    if max_num_batched_tokens:
        kw["max_num_batched_tokens"] = int(max_num_batched_tokens)
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), **kw)
    t_start = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    t1 = time.perf_counter()
    outs = llm.generate(_prompts(c.prompt_ids for c in cases), sp, use_tqdm=False)
    t_gen = time.perf_counter() - t1
    res = []
    for c, o in zip(cases, outs):
        ans = o.outputs[0].text
        res.append(NiahResult(c.context, len(c.prompt_ids), c.depth, _found(ans), ans.strip(), t_gen / len(cases)))
    close_engine(llm)
    del llm, outs
    free_device_memory()
    return res, t_start, t_gen
