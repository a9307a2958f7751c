"""The user docs stay true to the code: generated tables equal what the code generates now, every error message
quoted in docs/troubleshooting.md is in the file it names, and the refusal messages in docs/compatibility.md are
the backend's own (produced here by calling the backend's check)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NO_CUSTOM = "Serve this model without --attention-backend CUSTOM"


def _block(doc: Path, name: str) -> str:
    text = doc.read_text()
    m = re.search(rf"<!-- generated: {re.escape(name)} .*?-->\n(.*?)\n<!-- end: {re.escape(name)} -->", text, re.S)
    assert m, f"{doc.name}: no generated block {name!r}"
    return m.group(1)


def test_presets_table_is_generated_from_code():
    from tq_vllm.cli import presets_markdown
    assert _block(DOCS / "presets.md", "presets-table") == presets_markdown(), \
        "docs/presets.md is stale: python -c 'from tq_vllm.cli import regenerate_docs; regenerate_docs()'"


@pytest.mark.parametrize("block, model", [("capacity-llama", "Llama-3.1-8B-Instruct"), ("capacity-qwen", "Qwen3-8B")])
def test_presets_capacity_tables_are_generated_from_code(block, model):
    from tq_vllm.cli import capacity_markdown
    assert _block(DOCS / "presets.md", block) == capacity_markdown(str(ROOT / f"recipes/models/{model}.json"))


def test_recipes_table_is_generated_from_the_recipes():
    from tq_vllm.cli import recipes_markdown
    assert _block(DOCS / "recipes.md", "recipes-table") == recipes_markdown(str(ROOT / "recipes"))


def _normalized_source(path: Path) -> str:
    """Source text with adjacent string literals joined and the backend's `no_custom` spliced in, so a message that
    the code builds over several lines can be found in one piece."""
    src = path.read_text()
    src = re.sub(r"[\"']\s*\n\s*f?[\"']", "", src)  # "...abc "\n   f"def..." -> "...abc def..."
    src = re.sub(r"[\"']\s*\n?\s*\+\s*no_custom", NO_CUSTOM, src)
    src = src.replace("{no_custom}", NO_CUSTOM)
    src = src.replace("{no_custom[0].lower() + no_custom[1:]}", NO_CUSTOM[0].lower() + NO_CUSTOM[1:])
    return src


def test_troubleshooting_quotes_are_in_the_code():
    text = (DOCS / "troubleshooting.md").read_text()
    quotes = re.findall(r"^Raised by `([^`]+)`: `(.+)`$", text, re.M)
    assert len(quotes) >= 20
    missing = []
    for path, fragment in quotes:
        src = ROOT / path
        assert src.is_file(), f"troubleshooting.md names {path}, which does not exist"
        if fragment not in src.read_text() and fragment not in _normalized_source(src):
            missing.append(f"{path}: {fragment}")
    assert not missing, "messages quoted in docs/troubleshooting.md but no longer in the code:\n" + "\n".join(missing)


def test_troubleshooting_covers_the_required_topics():
    text = (DOCS / "troubleshooting.md").read_text()
    for topic in ("PackageNotFoundError: vllm", "torchvision::nms", "staging_slots", "PYTHONHASHSEED",
                  "VLLM_CPU_KVCACHE_SPACE", 'if __name__ == "__main__":'):
        assert topic in text, topic


def _compat_rows() -> dict[str, str]:
    rows = {}
    for line in (DOCS / "compatibility.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("`tq_vllm"):
            rows[cells[0].strip("*")] = cells[3].strip("`").split("` (")[0]
    return rows


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_compatibility_messages_are_the_backends():
    """Each model type's message in docs/compatibility.md, placeholders filled in, is exactly what the backend's
    check raises for such a layer."""
    from vllm.v1.attention.backend import AttentionType

    from tq_vllm.attention import backend as be

    base = dict(num_heads=8, head_size=128, num_kv_heads=2, alibi_slopes=None, sliding_window=None,
                kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                kv_sharing_target_layer_name=None, extra={})

    def msg(**kw):
        with pytest.raises(be.TQUnsupportedError) as e:
            be.check_layer(None, **{**base, **kw})
        return str(e.value)

    cases = {  # row of the table -> (actual message, placeholders in the doc's version)
        "MLA": (be.MLA_MESSAGE, {}),
        "sliding window": (msg(sliding_window=4096), {"W": "4096", "LAYERS": "all layers"}),
        "attention sinks": (msg(extra={"sinks": object()}), {}),
        "encoder-decoder": (msg(attn_type=AttentionType.ENCODER_DECODER),
                            {"ATTN_TYPE": getattr(AttentionType.ENCODER_DECODER, "value",
                                                  AttentionType.ENCODER_DECODER)}),
        "head size not in 64/96/128/256": (msg(head_size=80), {"H": "80"}),
        "ALiBi": (msg(alibi_slopes=[1.0] * 8), {}),
        "logit soft-capping": (msg(logits_soft_cap=30.0), {"C": "30.0"}),
        "cross-layer KV sharing": (msg(kv_sharing_target_layer_name="model.layers.0.self_attn.attn"), {}),
    }
    rows = _compat_rows()
    for key, (actual, subs) in cases.items():
        row = next((v for k, v in rows.items() if k.startswith(key)), None)
        assert row is not None, f"compatibility.md has no row starting with {key!r}"
        doc = row
        for ph, val in subs.items():
            doc = re.sub(rf"\b{ph}\b", str(val), doc)
        assert doc == actual, f"{key}:\n doc:  {doc}\n code: {actual}"


def test_benchmarks_skeleton():
    text = (DOCS / "benchmarks.md").read_text()
    for section in ("## Decode kernels", "## End-to-end", "## Connector", "## Quality"):
        assert section in text
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        for field in ("- device:", "- vLLM:", "- date:", "- command:", "|"):
            assert field in body, f"{section}: no {field!r}"


def test_docs_link_to_existing_files():
    for doc in ("presets.md", "compatibility.md", "troubleshooting.md", "recipes.md", "benchmarks.md"):
        text = (DOCS / doc).read_text()
        for target in re.findall(r"\]\(([^)#:]+?)(?:#[^)]*)?\)", text):
            if target.endswith(".md") and not (DOCS / target).exists():
                if target in ("quality.md", "backend.md", "connector.md"):
                    continue  # written by the eval / backend / storage engineers
                pytest.fail(f"{doc} links to {target}, which does not exist")
            if target.startswith("../") and not (DOCS / target).resolve().exists():
                pytest.fail(f"{doc} links to {target}, which does not exist")
