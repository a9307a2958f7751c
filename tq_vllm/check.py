"""`tq-vllm check RECIPE.yaml`: validate a `vllm serve --config` recipe against a model's config before launch.

What is checked (every problem says what is wrong and how to fix it):

* the recipe itself, with the installed vLLM's own parser (`FlexibleArgumentParser` + the `vllm serve` arguments,
  `--config FILE`): unknown keys, bad values, nested configs (`kv-transfer-config` forbids extra keys in 0.32+);
  plus the portability traps between vLLM 0.26 and 0.32+ (0.26 drops `key: false`; 0.32 removed
  kv_buffer_size/kv_rank/kv_parallel_size/kv_ip);
* the model (its `config.json`): head size, GQA/MQA layout and tensor parallelism, and the layer types tq_vllm
  refuses (MLA, sliding window, attention sinks, encoder-decoder/encoder-only, Mamba/SSM/hybrid, ALiBi, soft-cap);
* the tq_vllm options (`additional-config: {tq_vllm: ...}`) through `tq_vllm.config.TQConfig` (its errors),
  the attention-backend selection, the block size, staging slots vs max-num-seqs, conflicting vLLM options;
* the connector (`kv-transfer-config` with `TQConnector`) through `tq_vllm.connector.config.ConnectorConfig`,
  and its tier budgets (CPU pool, disk, Redis) in blocks and tokens of this model;
* the KV capacity for a given GPU memory (or CPU KV space) vs bf16 pages: weights estimated from the config,
  tokens = free bytes / (sum over layers of KV heads x bytes per token per KV head), PageLayout bytes, boundary
  layers counted with their own format, tq_vllm's exact staging buffers subtracted.

The recipe's expected-capacity block (`# expect.NAME: VALUE` lines between the `>>> tq-vllm expect` markers) is
compared with the recomputed numbers; `--update-expect` rewrites it. Library use: `check_recipe(...) -> Report`.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 1 << 30
# Non-KV, non-weight memory vLLM keeps out of the KV budget on a GPU (CUDA context, activation peak of the profile
# run, sampler, NCCL). Calibrated on vLLM 0.26 / H200 / Llama-3.1-8B shape / bf16 / util 0.85, which reported
# 834,128 KV tokens: 140.4 GiB x 0.85 - 14.96 GiB weights - 101.8 GiB KV = 2.56 GiB.
DEFAULT_OVERHEAD_GIB = 2.5
RECORD_HEADER = 64  # tq_vllm.connector.record.HEADER_SIZE (not imported: keeps this module light)
EXPECT_BEGIN = "# >>> tq-vllm expect"
EXPECT_END = "# <<< tq-vllm expect"
EXPECT_INPUTS = ("gpu_memory_gib", "kv_cache_gib", "tensor_parallel_size")
EXPECT_OUTPUTS = ("kv_bytes_per_token", "bf16_kv_bytes_per_token", "kv_tokens", "bf16_kv_tokens", "capacity_gain",
                  "full_context_sequences", "bf16_full_context_sequences")
NO_CUSTOM = "serve this model without attention-backend CUSTOM (vLLM's own backends)"
# keys vLLM 0.32 removed from KVTransferConfig (extra keys are forbidden there): never in a shared recipe
REMOVED_KV_TRANSFER_KEYS = ("kv_buffer_size", "kv_rank", "kv_parallel_size", "kv_ip")


class CheckUsageError(Exception):
    """The check could not run (missing file, unreadable YAML, ...): exit code 2."""


@dataclass
class Finding:
    level: str  # "error" | "warning" | "info"
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


# ================================================================================================ the model
@dataclass
class ModelShape:
    name: str
    source: str
    model_type: str
    architectures: list
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    hidden: int
    vocab: int
    intermediate: int
    tie_embeddings: bool
    max_position: int | None
    dtype: str
    params: int
    weight_bytes_per_param: float
    weight_note: str = ""

    @property
    def gqa_group(self) -> int:
        return self.num_heads // max(1, self.num_kv_heads)

    def describe(self) -> str:
        kind = "MQA" if self.num_kv_heads == 1 else ("MHA" if self.gqa_group == 1 else f"GQA {self.gqa_group}")
        return (f"{self.model_type}, {self.num_layers} layers, {self.num_heads} query / {self.num_kv_heads} KV heads "
                f"({kind}), head_dim {self.head_dim}, ~{self.params / 1e9:.2f} B params, {self.dtype}")


_GATED_MLP_FREE = {"gpt2", "gpt_neox", "falcon", "phi", "gptj", "opt", "bloom", "starcoder2", "gpt_bigcode", "mpt"}
_MAMBA_TYPES = {"mamba", "mamba2", "falcon_mamba", "jamba", "zamba", "zamba2", "bamba", "falcon_h1", "nemotron_h",
                "granitemoehybrid", "plamo2", "qwen3_next", "lfm2", "minimax", "minimax_m1", "minimax_text_01",
                "kimi_linear", "hunyuan_v1_moe_hybrid", "rwkv", "rwkv6", "retnet", "xlstm", "recurrent_gemma"}
_HYBRID_KEYS = ("layers_block_type", "hybrid_override_pattern", "attn_layer_indices", "attn_layer_period", "ssm_cfg",
                "mamba_d_state", "mamba_expand", "linear_attn_config", "full_attn_layers", "linear_key_head_dim")
_ENCODER_ONLY_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra",
                       "modernbert", "nomic_bert", "gte", "new", "xlm_roberta"}
_ENCODER_DECODER_TYPES = {"t5", "mt5", "umt5", "bart", "mbart", "whisper", "pegasus", "marian", "mllama", "florence2",
                          "nllb-moe", "m2m_100", "prophetnet", "blenderbot", "led", "longt5", "switch_transformers"}
_SINK_TYPES = {"gpt_oss"}
_ALIBI_TYPES = {"bloom", "mpt", "baichuan", "jais"}


def text_config(cfg: dict) -> dict:
    """The decoder's config: the nested text/language config of multimodal models, else the config itself."""
    for key in ("text_config", "language_config", "llm_config", "thinker_config"):
        sub = cfg.get(key)
        if isinstance(sub, dict) and sub.get("num_hidden_layers"):
            return sub
        if isinstance(sub, dict) and isinstance(sub.get("text_config"), dict):
            return sub["text_config"]
    return cfg


def _first(d: dict, *keys, default=None):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def _dtype_of(cfg: dict, t: dict) -> str:
    d = _first(t, "torch_dtype", "dtype") or _first(cfg, "torch_dtype", "dtype") or "bfloat16"
    return str(d).replace("torch.", "")


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}.get(str(dtype), 2)


def model_shape(cfg: dict, name: str = "", source: str = "", dtype: str | None = None,
                quantization: str | None = None) -> ModelShape:
    """The shape of a decoder model from its config.json (and an estimate of its parameter count / weight bytes)."""
    t = text_config(cfg)
    mtype = str(t.get("model_type") or cfg.get("model_type") or "?")
    layers = int(_first(t, "num_hidden_layers", "n_layer", "num_layers", default=0) or 0)
    heads = int(_first(t, "num_attention_heads", "n_head", "num_heads", default=0) or 0)
    hidden = int(_first(t, "hidden_size", "n_embd", "d_model", default=0) or 0)
    if t.get("multi_query") is True:
        kv = 1
    else:
        kv = int(_first(t, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num",
                        default=heads) or heads)
    hd = _first(t, "head_dim", "attention_head_dim", "qk_head_dim")
    head_dim = int(hd) if hd else (hidden // heads if heads else 0)
    v_head_dim = int(_first(t, "v_head_dim", default=head_dim) or head_dim)
    vocab = int(_first(t, "vocab_size", default=cfg.get("vocab_size", 0)) or 0)
    inter = int(_first(t, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden) or 4 * hidden)
    tie = bool(_first(t, "tie_word_embeddings", default=cfg.get("tie_word_embeddings", False)))
    maxpos = _first(t, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    rope = t.get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "yarn" and maxpos \
            and rope.get("original_max_position_embeddings") and rope.get("factor"):
        maxpos = max(int(maxpos), int(rope["original_max_position_embeddings"] * rope["factor"]))
    # ---- parameters (dense decoder; MoE experts counted; an estimate, good to a few %) ----
    q, kvw = heads * head_dim, kv * head_dim
    attn = hidden * q + 2 * hidden * kvw + q * hidden
    if t.get("attention_bias") or t.get("qkv_bias"):
        attn += q + 2 * kvw
    experts = int(_first(t, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    mlp_mats = 2 if mtype in _GATED_MLP_FREE else 3
    dense_mlp = mlp_mats * hidden * inter
    if experts:
        moe_i = int(_first(t, "moe_intermediate_size", default=inter) or inter)
        shared = int(_first(t, "n_shared_experts", "num_shared_experts", default=0) or 0) * mlp_mats * hidden * moe_i
        shared += mlp_mats * hidden * int(t.get("shared_expert_intermediate_size") or 0)
        moe_mlp = experts * mlp_mats * hidden * moe_i + hidden * experts + shared
        dense_layers = int(_first(t, "first_k_dense_replace", default=0) or 0)
        step = int(t.get("decoder_sparse_step") or 1)
        only = set(t.get("mlp_only_layers") or [])
        n_moe = sum(1 for i in range(layers) if i >= dense_layers and i not in only and (i + 1) % step == 0)
        mlp_total = n_moe * moe_mlp + (layers - n_moe) * dense_mlp
    else:
        mlp_total = layers * dense_mlp
    embed = vocab * hidden
    params = embed + (0 if tie else embed) + layers * (attn + 2 * hidden) + mlp_total + hidden
    # ---- bytes per parameter ----
    dt = dtype if dtype and dtype not in ("auto", None) else _dtype_of(cfg, t)
    act_bytes = _dtype_bytes(dt)
    bpp, note = float(act_bytes), ""
    qc = cfg.get("quantization_config") or t.get("quantization_config")
    qm = (quantization or (qc or {}).get("quant_method") or "") if (quantization or qc) else ""
    if qm:
        bits = None
        if isinstance(qc, dict):
            bits = qc.get("bits") or qc.get("w_bit") or qc.get("weight_bits")
            groups = qc.get("config_groups") or {}
            for g in (groups.values() if isinstance(groups, dict) else []):
                w = (g or {}).get("weights") or {}
                bits = bits or w.get("num_bits")
        if str(qm).startswith("fp8") or qm in ("fbgemm_fp8", "modelopt") and not bits:
            bits = 8
        if bits:
            lin = params - embed * (1 if tie else 2)
            bpp = (lin * (float(bits) / 8 * 1.03) + (params - lin) * act_bytes) / max(1, params)
            note = f"{qm} {bits}-bit weights (embeddings at {act_bytes} B)"
        else:
            note = f"quantization {qm!r}: weight bytes assumed unquantized (pass --weights-gib)"
    return ModelShape(name=name, source=source, model_type=mtype, architectures=list(cfg.get("architectures") or []),
                      num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, v_head_dim=v_head_dim,
                      hidden=hidden, vocab=vocab, intermediate=inter, tie_embeddings=tie,
                      max_position=int(maxpos) if maxpos else None, dtype=dt, params=int(params),
                      weight_bytes_per_param=bpp, weight_note=note)


def _backend_message(name: str, default: str) -> str:
    """A message string from tq_vllm's backend when it imports (so check and the runtime say the same)."""
    try:
        from tq_vllm.attention import backend  # imports vLLM
        return str(getattr(backend, name))
    except Exception:
        return default


def model_findings(cfg: dict, shape: ModelShape, *, disable_sliding_window: bool = False,
                   max_model_len: int | None = None) -> list[Finding]:
    """Layer types and shapes tq_vllm refuses (error) or that need care (warning), from config.json alone."""
    out: list[Finding] = []
    t = text_config(cfg)
    mtype, archs = shape.model_type, " ".join(shape.architectures)
    err = lambda code, msg: out.append(Finding("error", code, msg))  # noqa: E731
    if t.get("kv_lora_rank") or mtype.startswith("deepseek_v") and t.get("q_lora_rank") is not None:
        err("mla", _backend_message("MLA_MESSAGE", "tq_vllm does not support MLA models (DeepSeek-V2/V3, Kimi-K2, "
                                    "...): their latent KV is not a per-head K/V pair that TurboQuant pages describe. "
                                    "Serve this model without --attention-backend CUSTOM (use vLLM's own MLA "
                                    "backends, optionally with --kv-cache-dtype fp8)"))
    layer_types = [str(x) for x in (t.get("layer_types") or [])] if isinstance(t.get("layer_types"), list) else []
    other = sorted({x for x in layer_types if "attention" not in x or "linear" in x})
    if mtype in _MAMBA_TYPES or any(k in t for k in _HYBRID_KEYS) or other or "Mamba" in archs:
        what = f"layer types {other}" if other else f"model type {mtype!r}"
        err("hybrid", f"tq_vllm does not support Mamba/SSM or hybrid (linear-attention) models ({what}): their "
                      f"state is not a paged per-head K/V cache and vLLM gives them several KV cache groups; "
                      f"{NO_CUSTOM}")
    if cfg.get("is_encoder_decoder") or t.get("is_encoder_decoder") or mtype in _ENCODER_DECODER_TYPES:
        err("encoder_decoder", f"tq_vllm compresses decoder self-attention only; this model ({mtype}) has "
                               f"encoder-decoder cross attention (e.g. Whisper, T5, BART, mllama); {NO_CUSTOM}")
    elif mtype in _ENCODER_ONLY_TYPES or "ForMaskedLM" in archs:
        err("encoder_only", f"tq_vllm compresses decoder self-attention only; this model ({mtype}, {archs}) is an "
                            f"encoder (bidirectional attention, no KV cache to compress); {NO_CUSTOM}")
    if mtype in _SINK_TYPES or t.get("attention_sinks") or t.get("use_sink") or t.get("sink_size"):
        err("sinks", f"tq_vllm does not support attention sinks (learned per-head sink logits, e.g. gpt-oss); "
                     f"{NO_CUSTOM}")
    window = t.get("sliding_window")
    sliding_idx = [i for i, x in enumerate(layer_types) if "sliding" in x]
    uses_window = bool(sliding_idx) or (window not in (None, 0, False) and t.get("use_sliding_window", True)
                                        is not False and not layer_types)
    if mtype in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not t.get("use_sliding_window", False):
        uses_window = bool(sliding_idx)
    if uses_window:
        where = (f"layers {sliding_idx} ({len(sliding_idx)} of {len(layer_types)})" if sliding_idx
                 else f"all {shape.num_layers} layers")
        if disable_sliding_window:
            msg = (f"sliding-window attention (window {window}) in {where} is turned into full attention by "
                   f"disable-sliding-window: true; vLLM caps max-model-len at the window")
            if window and max_model_len and max_model_len > int(window):
                err("sliding_window_len", f"{msg}, but max-model-len is {max_model_len} > {window}; lower it")
            else:
                out.append(Finding("info", "sliding_window_disabled", msg))
        else:
            err("sliding_window", f"tq_vllm supports full causal attention only; this model uses sliding-window "
                                  f"attention (window {window}) in {where}. If the window is not smaller than the "
                                  f"context you need, add `disable-sliding-window: true` (caps max-model-len to the "
                                  f"window, exact for the model); otherwise {NO_CUSTOM}")
    if mtype in _ALIBI_TYPES and (t.get("alibi") or mtype == "bloom" or (t.get("attn_config") or {}).get("alibi")):
        err("alibi", f"tq_vllm does not support ALiBi position biases ({mtype}); {NO_CUSTOM}")
    if t.get("attn_logit_softcapping") or t.get("attn_logit_soft_cap"):
        err("softcap", f"tq_vllm does not support attention logit soft-capping (soft cap "
                       f"{t.get('attn_logit_softcapping') or t.get('attn_logit_soft_cap')}, e.g. Gemma-2); "
                       f"{NO_CUSTOM}")
    if t.get("num_kv_shared_layers"):
        err("kv_sharing", f"tq_vllm does not support cross-layer KV sharing ({t['num_kv_shared_layers']} layers "
                          f"reuse another layer's KV cache); {NO_CUSTOM}")
    if not shape.num_layers or not shape.num_heads or not shape.head_dim:
        err("shape", f"cannot read layers/heads/head_dim from the model config ({shape.source}); is it a decoder "
                     f"LLM's config.json?")
        return out
    from tq_vllm.quant.layout import SUPPORTED_HEAD_DIMS
    if shape.head_dim not in SUPPORTED_HEAD_DIMS:
        err("head_size", f"tq_vllm: head size {shape.head_dim} is not supported (supported: "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}); {NO_CUSTOM}")
    if shape.v_head_dim != shape.head_dim:
        err("head_size_v", f"tq_vllm: value head size {shape.v_head_dim} != key head size {shape.head_dim}; "
                           f"tq_vllm pages hold K and V of one head size; {NO_CUSTOM}")
    if shape.num_heads % shape.num_kv_heads:
        err("gqa", f"tq_vllm: {shape.num_heads} query heads are not a multiple of {shape.num_kv_heads} KV heads")
    return out


# ================================================================================================ the recipe
def load_recipe(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CheckUsageError(f"recipe {str(path)!r} not found; pass the path of a YAML file for "
                              f"`vllm serve --config FILE` (see recipes/)")
    if p.suffix not in (".yaml", ".yml"):
        raise CheckUsageError(f"recipe {p.name!r} must end in .yaml or .yml (vLLM's --config only reads those)")
    try:
        import yaml
    except ImportError:
        raise CheckUsageError("reading YAML needs PyYAML: pip install pyyaml (vLLM installs it)") from None
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise CheckUsageError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CheckUsageError(f"{p}: the top level must be a mapping of vLLM options (`max-model-len: 8192`), "
                              f"got {type(data).__name__}")
    return data


def _ukey(k: str) -> str:
    return str(k).replace("-", "_")


def _as_dict(v) -> dict | None:
    """A nested config as a plain dict (vLLM parses some into dataclasses / pydantic objects)."""
    if v is None:
        return None
    if isinstance(v, dict):
        return v
    if isinstance(v, str):
        try:
            d = json.loads(v)
            return d if isinstance(d, dict) else None
        except ValueError:
            return None
    try:
        import dataclasses
        if dataclasses.is_dataclass(v):
            return {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
    except Exception:
        pass
    return dict(getattr(v, "__dict__", {}) or {})


class _RaisingParser:  # filled lazily with a FlexibleArgumentParser subclass
    cls = None


def vllm_parser():
    """vLLM's own `vllm serve` argument parser (FlexibleArgumentParser + make_arg_parser), raising instead of
    exiting on errors. Returns (parser, how) or (None, reason)."""
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        try:
            from vllm.utils import FlexibleArgumentParser  # older layouts
        except ImportError as e:
            return None, f"vLLM is not importable ({e})"
    if _RaisingParser.cls is None:
        class P(FlexibleArgumentParser):
            def error(self, message):  # argparse would print usage and exit(2)
                raise ValueError(message)

            def exit(self, status=0, message=None):
                raise ValueError(message or f"exit {status}")
        _RaisingParser.cls = P
    parser = _RaisingParser.cls()
    for mod in ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"):
        try:
            make_arg_parser = __import__(mod, fromlist=["make_arg_parser"]).make_arg_parser
        except (ImportError, AttributeError):
            continue
        return make_arg_parser(parser), f"`vllm serve` parser ({mod}.make_arg_parser)"
    from vllm.engine.arg_utils import AsyncEngineArgs
    return AsyncEngineArgs.add_cli_args(parser), "engine arguments only (AsyncEngineArgs.add_cli_args)"


def parse_with_vllm(path: str, model: str | None = None) -> tuple[dict | None, list[Finding], str]:
    """Parse the recipe with the installed vLLM's parser, exactly as `vllm serve [MODEL] --config FILE` does.
    Returns (settings with underscore keys | None, findings, description)."""
    findings: list[Finding] = []
    parser, how = vllm_parser()
    if parser is None:
        findings.append(Finding("warning", "no_vllm", f"{how}: the recipe's keys were not checked against vLLM's "
                                                      f"parser (run the check where vLLM is installed)"))
        return None, findings, how
    from tq_vllm.compat import vllm_version_str
    ver = vllm_version_str()
    argv = ["--config", str(path)] + (["--model", model] if model else [])
    try:
        ns = parser.parse_args(argv)
    except (ValueError, TypeError, AssertionError) as e:
        msg = str(e)
        m = re.search(r"unrecognized arguments: (.*)", msg)
        if m:
            opts = set(getattr(parser, "_option_string_actions", {}))
            for bad in m.group(1).split():
                if not bad.startswith("--"):
                    continue
                close = difflib.get_close_matches(bad, opts, n=1)
                hint = f" (did you mean `{close[0][2:]}`?)" if close else ""
                findings.append(Finding("error", "unknown_key", f"recipe key `{bad[2:]}` is not an option of vLLM "
                                                                f"{ver}{hint}; fix or delete it"))
        else:
            findings.append(Finding("error", "vllm_parse", f"vLLM {ver} rejects the recipe: {msg.strip()}"))
        return None, findings, how
    settings = {k: v for k, v in vars(ns).items()}
    if settings.get("model") and os.path.isdir(os.path.expanduser(str(settings["model"]))):
        # the dataclass EngineArgs builds from the namespace (its __post_init__ validates a few more things; it may
        # look a hub model id up, hence only for local model directories)
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            AsyncEngineArgs.from_cli_args(ns)
        except Exception as e:
            findings.append(Finding("error", "vllm_engine_args", f"vLLM {ver} EngineArgs rejects the recipe: "
                                                                 f"{type(e).__name__}: {e}"))
    return settings, findings, f"vLLM {ver} {how}"


def portability_findings(raw: dict) -> list[Finding]:
    """Recipe traps between vLLM versions (independent of the installed one)."""
    out = []
    for k, v in raw.items():
        if v is False:
            out.append(Finding("warning", "false_dropped",
                               f"`{k}: false`: vLLM 0.26 drops `key: false` from a --config file silently (0.32+ "
                               f"passes --no-{k}), so on 0.26 the default applies; delete the key if the default "
                               f"is what you want, or pass --no-{k} on the command line"))
        if k in ("config",):
            out.append(Finding("error", "nested_config", "a recipe cannot include another --config"))
    kv = _as_dict(raw.get("kv-transfer-config", raw.get("kv_transfer_config")))
    for key in REMOVED_KV_TRANSFER_KEYS:
        if kv and key in kv:
            out.append(Finding("error", "kv_transfer_removed_key",
                               f"kv-transfer-config.{key}: removed in vLLM 0.32 (its config forbids extra keys, so "
                               f"0.32+ refuses the recipe); TQConnector does not use it; delete it"))
    return out


def _settings_from_yaml(raw: dict, model: str | None) -> dict:
    s = {_ukey(k): v for k, v in raw.items()}
    if model:
        s["model"] = model
    return s


# ================================================================================================ capacity
@dataclass
class CapacityEstimate:
    device: str  # "gpu" | "cpu"
    memory_gib: float  # GPU total memory, or the KV space given directly
    utilization: float | None
    tensor_parallel_size: int
    block_size: int
    layers: list  # per layer (of one rank): format name
    kv_heads_per_rank: int
    weights_gib: float
    staging_gib: float
    overhead_gib: float
    kv_budget_bytes: int
    bf16_kv_budget_bytes: int
    kv_bytes_per_token: int
    bf16_kv_bytes_per_token: int
    kv_tokens: int
    bf16_kv_tokens: int
    max_model_len: int | None
    max_num_seqs: int
    staging_slots: int

    @property
    def capacity_gain(self) -> float:
        return round(self.kv_tokens / self.bf16_kv_tokens, 2) if self.bf16_kv_tokens else float("inf")

    @property
    def full_context_sequences(self) -> int | None:
        return self.kv_tokens // self.max_model_len if self.max_model_len else None

    @property
    def bf16_full_context_sequences(self) -> int | None:
        return self.bf16_kv_tokens // self.max_model_len if self.max_model_len else None

    def expectations(self) -> dict:
        d: dict[str, Any] = {}
        if self.device == "gpu":
            d["gpu_memory_gib"] = self.memory_gib
        else:
            d["kv_cache_gib"] = self.memory_gib
        if self.tensor_parallel_size != 1:
            d["tensor_parallel_size"] = self.tensor_parallel_size
        d.update(kv_bytes_per_token=self.kv_bytes_per_token, bf16_kv_bytes_per_token=self.bf16_kv_bytes_per_token,
                 kv_tokens=self.kv_tokens, bf16_kv_tokens=self.bf16_kv_tokens, capacity_gain=self.capacity_gain)
        if self.max_model_len:
            d["full_context_sequences"] = self.full_context_sequences
            d["bf16_full_context_sequences"] = self.bf16_full_context_sequences
        return d

    def lines(self) -> list[str]:
        fmts: dict[str, int] = {}
        for f in self.layers:
            fmts[f] = fmts.get(f, 0) + 1
        lay = ", ".join(f"{n} x {f}" for f, n in fmts.items())
        tp = f", TP {self.tensor_parallel_size} (per GPU)" if self.tensor_parallel_size > 1 else ""
        if self.device == "gpu":
            head = (f"{self.memory_gib:g} GiB GPU x {self.utilization:g} utilization{tp}: weights ~"
                    f"{self.weights_gib:.2f} GiB, tq_vllm staging {self.staging_gib:.2f} GiB "
                    f"({self.staging_slots} slots), other ~{self.overhead_gib:g} GiB (assumed) -> KV "
                    f"{self.kv_budget_bytes / GIB:.2f} GiB (bf16: {self.bf16_kv_budget_bytes / GIB:.2f} GiB)")
        else:
            head = f"KV space {self.memory_gib:g} GiB (VLLM_CPU_KVCACHE_SPACE / kv-cache-memory-bytes){tp}"
        out = [head,
               f"KV bytes per token: {self.kv_bytes_per_token:,} ({lay}; {self.kv_heads_per_rank} KV heads each) "
               f"vs bf16 {self.bf16_kv_bytes_per_token:,}: "
               f"{self.bf16_kv_bytes_per_token / self.kv_bytes_per_token:.2f}x"
               f" smaller",
               f"KV tokens: {self.kv_tokens:,} vs bf16 {self.bf16_kv_tokens:,} ({self.capacity_gain:g}x) "
               f"[{self.kv_tokens // self.block_size:,} blocks of {self.block_size}]"]
        if self.max_model_len:
            out.append(f"at max-model-len {self.max_model_len:,}: {self.full_context_sequences} full-length "
                       f"sequences at once (bf16: {self.bf16_full_context_sequences}); max-num-seqs "
                       f"{self.max_num_seqs}")
        return out


def layer_formats(tq, num_layers: int) -> list:
    """Per layer: the Preset of its pages, or None for exact (bf16) pages."""
    return [tq.boundary_preset if tq.is_boundary(i, num_layers) else tq.preset for i in range(num_layers)]


def estimate_capacity(shape: ModelShape, tq, *, block_size: int, max_num_seqs: int, gpu_memory_gib: float | None = None,
                      kv_cache_gib: float | None = None, gpu_memory_utilization: float = 0.9,
                      tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, max_model_len: int | None = None,
                      overhead_gib: float = DEFAULT_OVERHEAD_GIB, weights_gib: float | None = None,
                      act_dtype_bytes: int | None = None) -> CapacityEstimate:
    """KV capacity of one GPU (rank) with tq_vllm pages and with bf16 pages.

    GPU: budget = gpu_memory x utilization - weights/TP - overhead (- tq_vllm staging for the tq_vllm case).
    CPU (or `kv-cache-memory-bytes`): the KV budget is given. Tokens = budget // (B x bytes/token) x B,
    bytes/token = sum over this rank's layers of KV heads x PageLayout bytes per token per KV head."""
    from tq_vllm.attention.capacity import bytes_per_token

    tp, pp = max(1, int(tensor_parallel_size)), max(1, int(pipeline_parallel_size))
    B = int(block_size)
    itemsize = act_dtype_bytes or _dtype_bytes(shape.dtype)
    kvh = max(1, shape.num_kv_heads // tp) if shape.num_kv_heads >= tp else 1
    fmts = layer_formats(tq, shape.num_layers)
    per_layer = [kvh * bytes_per_token(f, shape.head_dim, B, itemsize) for f in fmts]
    n_rank = math.ceil(shape.num_layers / pp)
    per_token = math.ceil(sum(per_layer) * n_rank / shape.num_layers)
    bf16_per_token = n_rank * kvh * 4 * shape.head_dim
    slots = tq.num_staging_slots(int(max_num_seqs))
    staged_layers = sum(1 for f in fmts if f is not None) * n_rank / shape.num_layers
    staging = int(staged_layers * (slots + 1) * 2 * B * kvh * shape.head_dim * itemsize)
    if weights_gib is None:
        weights = shape.params * shape.weight_bytes_per_param / (tp * pp)
    else:
        weights = weights_gib * GIB
    if kv_cache_gib is not None:
        device, mem, util = "cpu", float(kv_cache_gib), None
        budget = bf16_budget = int(kv_cache_gib * GIB)
        overhead = 0.0
    elif gpu_memory_gib is not None:
        device, mem, util = "gpu", float(gpu_memory_gib), float(gpu_memory_utilization)
        bf16_budget = int(gpu_memory_gib * GIB * util - weights - overhead_gib * GIB)
        budget = bf16_budget - staging
        overhead = overhead_gib
    else:
        raise ValueError("give gpu_memory_gib or kv_cache_gib")
    tokens = max(0, budget) // (B * per_token) * B
    bf16_tokens = max(0, bf16_budget) // (B * bf16_per_token) * B
    return CapacityEstimate(device=device, memory_gib=mem, utilization=util, tensor_parallel_size=tp, block_size=B,
                            layers=[f.name if f is not None else "bf16" for f in fmts], kv_heads_per_rank=kvh,
                            weights_gib=weights / GIB, staging_gib=staging / GIB if device == "gpu" else 0.0,
                            overhead_gib=overhead, kv_budget_bytes=budget, bf16_kv_budget_bytes=bf16_budget,
                            kv_bytes_per_token=per_token, bf16_kv_bytes_per_token=bf16_per_token, kv_tokens=tokens,
                            bf16_kv_tokens=bf16_tokens, max_model_len=max_model_len, max_num_seqs=int(max_num_seqs),
                            staging_slots=slots)


# ================================================================================================ expectations
_EXPECT_RE = re.compile(r"^#\s*expect\.([a-z0-9_]+):\s*([^\s#]+)")


def read_expectations(path: str | os.PathLike) -> dict:
    """`# expect.NAME: VALUE` lines of a recipe (numbers as int/float)."""
    out: dict[str, Any] = {}
    for line in Path(path).read_text().splitlines():
        m = _EXPECT_RE.match(line.strip())
        if m:
            v = m.group(2).replace(",", "")
            try:
                out[m.group(1)] = int(v)
            except ValueError:
                try:
                    out[m.group(1)] = float(v.rstrip("x"))
                except ValueError:
                    out[m.group(1)] = v
    return out


def render_expectations(cap: CapacityEstimate, shape: ModelShape) -> str:
    d = cap.expectations()
    where = (f"{cap.memory_gib:g} GiB GPU at utilization {cap.utilization:g}" if cap.device == "gpu"
             else f"{cap.memory_gib:g} GiB of CPU KV space (VLLM_CPU_KVCACHE_SPACE={cap.memory_gib:g})")
    lines = [EXPECT_BEGIN + " (written by `tq-vllm check --update-expect`; tests/test_recipes.py recomputes it)",
             f"# Expected capacity on {where}"
             + (f", TP {cap.tensor_parallel_size}" if cap.tensor_parallel_size > 1 else "") + ":",
             f"#   {cap.capacity_gain:g}x the KV tokens of bf16 pages: {cap.kv_tokens:,} vs {cap.bf16_kv_tokens:,} "
             f"({cap.kv_bytes_per_token:,} vs {cap.bf16_kv_bytes_per_token:,} bytes per token over "
             f"{shape.num_layers} layers x {cap.kv_heads_per_rank} KV heads)"]
    if cap.device == "gpu":
        lines.append(f"#   weights ~{cap.weights_gib:.1f} GiB, tq_vllm staging {cap.staging_gib:.2f} GiB, other "
                     f"~{cap.overhead_gib:g} GiB assumed")
    if cap.max_model_len:
        lines.append(f"#   {cap.full_context_sequences} sequences at the full {cap.max_model_len:,}-token context at "
                     f"once (bf16: {cap.bf16_full_context_sequences})")
    for k, v in d.items():
        lines.append(f"# expect.{k}: {v}")
    lines.append(EXPECT_END)
    return "\n".join(lines) + "\n"


def write_expectations(path: str | os.PathLike, block: str) -> None:
    p = Path(path)
    text = p.read_text()
    start, end = text.find(EXPECT_BEGIN), text.find(EXPECT_END)
    if start >= 0 and end > start:
        end = text.index("\n", end) + 1 if "\n" in text[end:] else len(text)
        text = text[:start] + block + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


# ================================================================================================ the check
@dataclass
class Report:
    recipe: str
    findings: list = field(default_factory=list)
    sections: list = field(default_factory=list)  # (title, [lines])
    capacity: CapacityEstimate | None = None
    shape: ModelShape | None = None
    expectations: dict = field(default_factory=dict)

    @property
    def errors(self) -> list:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list:
        return [f for f in self.findings if f.level == "warning"]

    def add(self, level: str, code: str, message: str) -> None:
        self.findings.append(Finding(level, code, message))

    def section(self, title: str, lines) -> None:
        self.sections.append((title, [lines] if isinstance(lines, str) else list(lines)))

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "ok": not self.errors, "findings": [asdict(f) for f in self.findings],
                "sections": {t: ls for t, ls in self.sections},
                "capacity": ({**asdict(self.capacity), **self.capacity.expectations()} if self.capacity else None),
                "model": asdict(self.shape) if self.shape else None}

    def render(self) -> str:
        out = [f"tq-vllm check {self.recipe}"]
        w = max([len(t) for t, _ in self.sections] + [8])
        for title, lines in self.sections:
            for i, ln in enumerate(lines):
                out.append(f"  {(title if i == 0 else ''):<{w}}  {ln}")
        for level in ("info", "warning", "error"):
            for f in self.findings:
                if f.level == level:
                    out.append(f"{'note' if level == 'info' else level}: {f.message}")
        n_e, n_w = len(self.errors), len(self.warnings)
        out.append(("FAILED" if n_e else "OK") + f": {n_e} error{'s' * (n_e != 1)}, {n_w} warning{'s' * (n_w != 1)}")
        return "\n".join(out)


def find_model_config(model: str | None, model_config: str | None, recipe: str | None) -> tuple[dict | None, str]:
    """config.json of the model: --model-config; a local model dir; the Hugging Face cache (offline);
    `<recipe dir>/models/<model basename>.json`. Returns (config | None, where it came from / why not)."""
    cands: list[Path] = []
    if model_config:
        p = Path(model_config)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise CheckUsageError(f"--model-config {model_config!r}: no such file (give a config.json or a model "
                                  f"directory)")
        cands.append(p)
    elif model:
        p = Path(os.path.expanduser(model))
        if p.is_dir():
            cands.append(p / "config.json")
        else:
            try:
                from huggingface_hub import try_to_load_from_cache
                hit = try_to_load_from_cache(model, "config.json")
                if isinstance(hit, str):
                    cands.append(Path(hit))
            except Exception:
                pass
            if recipe:
                base = model.rstrip("/").split("/")[-1]
                cands.append(Path(recipe).resolve().parent / "models" / f"{base}.json")
    for c in cands:
        if c.is_file():
            try:
                return json.loads(c.read_text()), str(c)
            except ValueError as e:
                raise CheckUsageError(f"{c}: not valid JSON: {e}") from None
    if not model and not model_config:
        return None, "the recipe names no model (add `model:` or pass --model / --model-config)"
    return None, (f"no config.json found for {model!r} (not a local directory, not in the Hugging Face cache, no "
                  f"recipes/models/ entry); pass --model-config PATH/config.json")


def _attention_selection(s: dict) -> tuple[str | None, dict]:
    name = lambda v: None if v is None else str(getattr(v, "name", v)).upper()  # noqa: E731
    backend = name(s.get("attention_backend"))
    ac = _as_dict(s.get("attention_config")) or {}
    per_kind = {k: name(v) for k, v in (ac.get("backend_per_kind") or {}).items()}
    return backend or name(ac.get("backend")), per_kind


def _int(v, default=None):
    if v is None:
        return default
    if isinstance(v, str):
        from tq_vllm.connector.config import parse_bytes
        try:
            return int(v)
        except ValueError:
            return parse_bytes(v)
    return int(v)


def check_recipe(recipe: str, *, model: str | None = None, model_config: str | None = None,
                 gpu_memory_gib: float | None = None, kv_cache_gib: float | None = None,
                 overhead_gib: float = DEFAULT_OVERHEAD_GIB, weights_gib: float | None = None,
                 use_vllm: bool = True) -> Report:
    rep = Report(recipe=str(recipe))
    raw = load_recipe(recipe)
    rep.findings += portability_findings(raw)

    # ---- 1. vLLM's parser ----
    settings = None
    if use_vllm:
        settings, fs, how = parse_with_vllm(str(recipe), model)
        rep.findings += fs
        if settings is not None:
            rep.section("recipe", f"parsed by {how}: {len(raw)} keys OK")
    if settings is None:
        settings = _settings_from_yaml(raw, model)
        if not use_vllm:
            rep.section("recipe", f"{len(raw)} keys (read as YAML only; --no-vllm-parse)")
    set_keys = {_ukey(k) for k in raw}
    for k in ("additional_config", "kv_transfer_config", "attention_config", "speculative_config"):
        if k in settings and not isinstance(settings[k], dict) and settings[k] is not None:
            d = _as_dict(settings[k])
            if d is not None:
                settings[k] = d
    # (without `model:` in the recipe or --model, vLLM's parser fills in its own default model: ignore that)
    model_name = model or (settings.get("model") if "model" in set_keys else None)
    dtype = settings.get("dtype") or "auto"
    quant = settings.get("quantization")

    # ---- 2. the model ----
    cfg, where = find_model_config(model_name, model_config, str(recipe))
    shape = None
    if cfg is None:
        rep.add("warning", "no_model_config", f"{where}; model checks and the capacity estimate are skipped")
    else:
        shape = model_shape(cfg, name=str(model_name or ""), source=where, dtype=str(dtype), quantization=quant)
        rep.shape = shape
        rep.section("model", [f"{model_name or '(from --model-config)'}: {shape.describe()}", f"config: {where}"]
                    + ([shape.weight_note] if shape.weight_note else []))
        rep.findings += model_findings(cfg, shape, disable_sliding_window=bool(settings.get("disable_sliding_window")),
                                       max_model_len=_int(settings.get("max_model_len")))

    # ---- 3. backend selection and vLLM options that conflict ----
    backend, per_kind = _attention_selection(settings)
    addl = _as_dict(settings.get("additional_config")) or {}
    tq_raw = addl.get("tq_vllm")
    kvt = _as_dict(settings.get("kv_transfer_config"))
    uses_tq = backend == "CUSTOM" or "CUSTOM" in per_kind.values()
    if not uses_tq:
        msg = (f"the recipe does not select tq_vllm's attention backend (attention-backend is "
               f"{backend or 'not set'}): add `attention-backend: CUSTOM`")
        if tq_raw is not None:
            rep.add("error", "no_custom_backend", msg + " (its additional-config tq_vllm section is ignored otherwise)")
        elif kvt and kvt.get("kv_connector") == "TQConnector":
            rep.add("warning", "no_custom_backend", msg + " to store compressed pages (TQConnector alone stores "
                                                          "vLLM's own pages as opaque bytes)")
        else:
            rep.add("error", "no_custom_backend", msg)
    elif per_kind and backend != "CUSTOM":
        kinds = sorted(k for k, v in per_kind.items() if v == "CUSTOM")
        rep.add("info", "per_kind", f"tq_vllm serves the layer kinds {kinds}"
                                    f" only (attention-config.backend_per_kind)")
    kv_dtype = str(settings.get("kv_cache_dtype") or "auto")
    if uses_tq and kv_dtype not in ("auto", "bfloat16", "float16", "float32"):
        rep.add("error", "kv_cache_dtype", f"kv-cache-dtype {kv_dtype} conflicts with the tq_vllm backend, which "
                                           f"stores its own format chosen by the preset; delete kv-cache-dtype and "
                                           f"pick the bits with additional-config: {{tq_vllm: {{preset: tq3}}}}")
    if uses_tq and settings.get("kv_cache_dtype_skip_layers"):
        rep.add("error", "skip_layers", "kv-cache-dtype-skip-layers does not apply to the tq_vllm backend; keep "
                                        "layers at higher precision with additional-config: {tq_vllm: "
                                        "{boundary_layers: 2, boundary_preset: tq8}} (or bf16)")
    for k in ("kv_offloading_size", "kv_offloading_backend"):
        if k in set_keys and settings.get(k) and kvt:
            rep.add("error", "two_connectors", f"{k.replace('_', '-')} configures vLLM's own offloading connector, "
                                               f"which conflicts with kv-transfer-config; use one of them")
    if uses_tq and str(dtype) in ("float32", "float"):
        rep.add("warning", "dtype", "dtype float32: tq_vllm on CUDA needs bfloat16 or float16 (fine on CPU)")

    # ---- 4. tq_vllm options ----
    from tq_vllm.config import TQConfig, TQConfigError
    tq = None
    if isinstance(tq_raw, str):
        try:
            tq_raw = json.loads(tq_raw)
        except ValueError as e:
            rep.add("error", "tq_json", f"additional-config.tq_vllm is not valid JSON: {e}")
            tq_raw = None
    try:
        tq = TQConfig.from_dict(tq_raw if isinstance(tq_raw, dict) else None)
        if tq_raw is not None and not isinstance(tq_raw, dict):
            rep.add("error", "tq_type", f"additional-config.tq_vllm must be a mapping, got {type(tq_raw).__name__}")
    except TQConfigError as e:
        rep.add("error", "tq_config", str(e))
    for k in addl:
        if k != "tq_vllm" and k.lower().replace("-", "_") in ("tq_vllm", "tqvllm", "tq"):
            rep.add("error", "tq_section", f"additional-config.{k}: the section must be named tq_vllm")
    block_size = _int(settings.get("block_size"))
    if block_size is None:
        rep.add("warning", "block_size", "block-size is not set: vLLM picks it (16 with tq_vllm on GPU; the CPU "
                                         "platform may pick 128) and page bytes per token depend on it; set "
                                         "`block-size: 32`")
    bs = block_size or 16
    max_num_seqs = _int(settings.get("max_num_seqs"))
    if max_num_seqs is None:
        big = (gpu_memory_gib or 0) >= 70
        max_num_seqs = 1024 if big else 256
        rep.add("warning", "max_num_seqs", f"max-num-seqs is not set: vLLM's default ({max_num_seqs} on "
                                           f"{'>= 70 GiB GPUs' if big else 'this GPU size'}) sizes tq_vllm's exact "
                                           f"staging (one open block per sequence per layer); set max-num-seqs to "
                                           f"the concurrency you target")
    max_model_len = _int(settings.get("max_model_len"))
    if shape and max_model_len is None:
        max_model_len = shape.max_position
        rep.add("warning", "max_model_len", f"max-model-len is not set: vLLM uses the model's "
                                            f"{shape.max_position} tokens; set it to the context you target")
    if shape and max_model_len and shape.max_position and max_model_len > shape.max_position:
        rep.add("error", "max_model_len_too_long", f"max-model-len {max_model_len} exceeds the model's "
                                                   f"max_position_embeddings {shape.max_position}: vLLM refuses it; "
                                                   f"lower max-model-len (or add rope scaling)")
    tp = _int(settings.get("tensor_parallel_size"), 1) or 1
    pp = _int(settings.get("pipeline_parallel_size"), 1) or 1
    if tq is not None:
        lay_lines = []
        try:
            from tq_vllm.quant.layout import PageLayout
            if shape:
                tq.check_layers(shape.num_layers)
                lay = PageLayout(tq.preset, shape.head_dim, bs)
                lay_lines.append(f"{tq.describe()}; {lay.bytes_per_token} B/token/KV head at head_dim "
                                 f"{shape.head_dim}, block {bs} ({lay.compression_vs_bf16():.2f}x vs bf16)")
                if tq.has_boundary and tq.boundary_preset is not None:
                    blay = PageLayout(tq.boundary_preset, shape.head_dim, bs)
                    lay_lines.append(f"boundary layers: {blay.bytes_per_token} B/token/KV head "
                                     f"({tq.boundary_preset.name})")
            else:
                lay_lines.append(tq.describe())
            slots = tq.num_staging_slots(max_num_seqs)
            lay_lines.append(f"staging: {slots} slots per layer (max-num-seqs {max_num_seqs} + margin)")
        except TQConfigError as e:
            rep.add("error", "tq_config", str(e))
        except ValueError as e:
            rep.add("error", "page_layout", f"tq_vllm: {e}")
        if uses_tq:
            rep.section("tq_vllm", lay_lines)
    spec = _as_dict(settings.get("speculative_config")) or {}
    n_spec = _int(spec.get("num_speculative_tokens"), 0) or 0
    if uses_tq and n_spec and n_spec + 1 >= bs:
        rep.add("error", "spec_block", f"tq_vllm: num_speculative_tokens={n_spec} needs block-size > {n_spec + 1} "
                                       f"(a verification step may cross at most one block boundary); raise block-size")
    if shape and shape.num_heads % tp:
        rep.add("error", "tp_heads", f"tensor-parallel-size {tp} does not divide the {shape.num_heads} query heads")
    if shape and shape.num_kv_heads % tp and tp % shape.num_kv_heads:
        rep.add("error", "tp_kv_heads", f"tensor-parallel-size {tp} and {shape.num_kv_heads} KV heads: one must "
                                        f"divide the other")

    # ---- 5. capacity ----
    cap = None
    exp = read_expectations(recipe)
    rep.expectations = exp
    if gpu_memory_gib is None and kv_cache_gib is None:
        gpu_memory_gib, kv_cache_gib = exp.get("gpu_memory_gib"), exp.get("kv_cache_gib")
    kvmb = _int(settings.get("kv_cache_memory_bytes"))
    if kvmb and kv_cache_gib is None:
        kv_cache_gib = kvmb / GIB
    if gpu_memory_gib is None and kv_cache_gib is None:
        try:
            import torch
            if torch.cuda.is_available():
                gpu_memory_gib = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
        except Exception:
            pass
    if shape and tq is not None and uses_tq and not rep.errors and (gpu_memory_gib or kv_cache_gib):
        util = float(settings.get("gpu_memory_utilization") or 0.9)
        try:
            cap = estimate_capacity(shape, tq, block_size=bs, max_num_seqs=max_num_seqs,
                                    gpu_memory_gib=gpu_memory_gib, kv_cache_gib=kv_cache_gib,
                                    gpu_memory_utilization=util, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                    max_model_len=max_model_len, overhead_gib=overhead_gib, weights_gib=weights_gib)
        except (TQConfigError, ValueError) as e:
            rep.add("error", "capacity", str(e))
        if cap is not None:
            rep.capacity = cap
            rep.section("capacity", cap.lines())
            if cap.kv_tokens <= 0:
                rep.add("error", "no_kv_memory", f"no memory left for the KV cache ({cap.kv_budget_bytes / GIB:.2f} "
                                                 f"GiB): use a bigger GPU, raise gpu-memory-utilization or "
                                                 f"tensor-parallel-size")
            elif max_model_len and cap.kv_tokens < max_model_len:
                rep.add("error", "max_model_len_capacity",
                        f"max-model-len {max_model_len:,} is larger than the KV cache ({cap.kv_tokens:,} tokens): "
                        f"vLLM refuses to start; lower max-model-len or free memory")
            elif max_model_len and cap.full_context_sequences is not None and \
                    cap.full_context_sequences < max_num_seqs and cap.device == "gpu":
                rep.add("info", "concurrency", f"{cap.full_context_sequences} sequences fit at the full "
                                               f"{max_model_len:,}-token context; up to max-num-seqs "
                                               f"{max_num_seqs} run at once when they are shorter")
            if cap.staging_gib > 1:
                rep.add("warning", "staging", f"tq_vllm's exact staging takes {cap.staging_gib:.2f} GiB per GPU "
                                              f"({cap.staging_slots} slots x {len(cap.layers)} layers): lower "
                                              f"max-num-seqs (or tq_vllm.staging_slots) if fewer sequences run")
            want = {k: v for k, v in exp.items() if k in EXPECT_OUTPUTS}
            if want:
                got = cap.expectations()
                bad = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != v}
                if bad:
                    rep.add("error", "expect_drift",
                            "the recipe's expected capacity differs from the recomputed one: "
                            + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in bad.items())
                            + f"; run `tq-vllm check --update-expect {recipe}` and review the diff")
    elif shape and tq is not None and uses_tq and not (gpu_memory_gib or kv_cache_gib):
        rep.add("info", "no_capacity", "pass --gpu-memory-gib N (GPU total memory in GiB) or --kv-cache-gib N (CPU) "
                                       "for the capacity estimate")

    # ---- 6. connector ----
    if kvt:
        _check_connector(rep, kvt, shape, tq if uses_tq else None, bs, tp, pp)
    return rep


def _check_connector(rep: Report, kvt: dict, shape: ModelShape | None, tq, bs: int, tp: int, pp: int) -> None:
    name = kvt.get("kv_connector")
    if name != "TQConnector":
        rep.section("connector", f"{name} (not tq_vllm's; not checked)")
        return
    lines = []
    if kvt.get("kv_connector_module_path") != "tq_vllm.connector":
        rep.add("error", "connector_module", f"kv-transfer-config.kv_connector_module_path is "
                                             f"{kvt.get('kv_connector_module_path')!r}: set it to tq_vllm.connector "
                                             f"(vLLM imports TQConnector from there)")
    role = kvt.get("kv_role")
    if role is None:
        rep.add("error", "kv_role", "kv-transfer-config.kv_role is required with a connector: set kv_role: kv_both")
    elif role != "kv_both":
        rep.add("info", "kv_role", f"kv_role {role}: TQConnector saves and loads by its own save/load settings")
    # (keys removed in vLLM 0.32 are flagged from the recipe's own text, `portability_findings`: vLLM 0.26's parser
    # returns a KVTransferConfig whose defaults include them, so `kvt` has them whether the recipe sets them or not)
    extra = kvt.get("kv_connector_extra_config") or {}
    from tq_vllm.connector.config import ConnectorConfig
    try:
        cc = ConnectorConfig.from_extra_config(extra)
    except (ValueError, TypeError) as e:
        rep.add("error", "connector_config", f"kv-transfer-config.kv_connector_extra_config: {e}")
        return
    block_bytes = None
    if shape:  # tq is None: vLLM's own bf16 pages (the recipe does not select tq_vllm's backend)
        from tq_vllm.attention.capacity import bytes_per_token
        kvh = max(1, shape.num_kv_heads // tp) if shape.num_kv_heads >= tp else 1
        n_rank = math.ceil(shape.num_layers / pp)
        fmts = layer_formats(tq, shape.num_layers)[:n_rank] if tq is not None else [None] * n_rank
        block_bytes = bs * sum(kvh * bytes_per_token(f, shape.head_dim, bs, _dtype_bytes(shape.dtype)) for f in fmts)
    workers = tp * pp

    def blocks(nbytes, per):
        return f"{nbytes // per:,} blocks = {nbytes // per * bs:,} tokens" if per else "?"

    cpu_line = f"CPU tier: {cc.cpu_bytes / GIB:.2f} GiB per worker"
    if block_bytes:
        cpu_line += f" = {blocks(cc.cpu_bytes, block_bytes)} ({block_bytes:,} B per block per worker)"
        if cc.cpu_bytes < block_bytes:
            rep.add("warning", "cpu_bytes", f"cpu_bytes {cc.cpu_bytes} is less than one block ({block_bytes} B): the "
                                            f"pool gets 1 block; raise cpu_bytes (e.g. '8G')")
    host = cc.cpu_bytes * workers
    pinned = " (pinned on CUDA)" if cc.pin_memory else ""
    cpu_line += f"; host RAM {host / GIB:.1f} GiB over {workers} worker(s){pinned}"
    lines.append(cpu_line)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if host > 0.8 * ram:
            rep.add("warning", "host_ram", f"the CPU tier needs {host / GIB:.1f} GiB of host RAM "
                                           f"(cpu_bytes x {workers} workers), more than 80% of this machine's "
                                           f"{ram / GIB:.1f} GiB (fine if the recipe targets a bigger host)")
    except (ValueError, OSError, AttributeError):
        pass
    if cc.disk_dir:
        d = Path(os.path.expanduser(cc.disk_dir))
        line = f"disk tier: {d} budget {cc.disk_bytes / GIB:.1f} GiB"
        if block_bytes:
            line += f" = {blocks(cc.disk_bytes, (block_bytes + RECORD_HEADER) * workers)}"
        lines.append(line + f", write={cc.disk_write}{', fsync' if cc.disk_fsync else ''}")
        parent = d
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not d.exists():
            rep.add("info", "disk_dir_missing", f"disk_dir {d} does not exist here (the connector creates it)")
        if parent.exists() and not os.access(parent, os.W_OK):
            rep.add("warning", "disk_dir_write", f"disk_dir {d}: {parent} is not writable by this user; the disk "
                                                 f"tier will fail to write (choose another disk_dir)")
        try:
            free = shutil.disk_usage(parent).free
            if cc.disk_bytes > free:
                rep.add("warning", "disk_space", f"disk_bytes {cc.disk_bytes / GIB:.1f} GiB exceeds the free space "
                                                 f"at {parent} here ({free / GIB:.1f} GiB); lower disk_bytes (fine if "
                                                 f"the recipe targets another host)")
        except OSError:
            pass
    url_raw = cc.redis_url
    if url_raw:
        url = cc.resolved_redis_url
        if url_raw.startswith("env:") and not url:
            rep.add("warning", "redis_env", f"redis_url {url_raw}: ${url_raw[4:]} is not set here, so the Redis "
                                            f"tier would be off; export {url_raw[4:]}=redis://HOST:PORT/DB")
        if url and not re.match(r"^(redis|rediss|unix)://", url):
            rep.add("error", "redis_url", f"redis_url {url!r} must start with redis://, rediss:// or unix://")
        lines.append(f"Redis tier: {url_raw}{' -> ' + url if url and url != url_raw else ''}, prefix "
                     f"{cc.redis_prefix!r}, write={cc.redis_write}"
                     + (f", ttl {cc.redis_ttl_s}s" if cc.redis_ttl_s else ""))
        try:
            import redis  # noqa: F401
        except ImportError:
            rep.add("warning", "redis_client", "the Redis tier needs the redis client: pip install redis "
                                               "(or tq-vllm[connector])")
    if cc.disk_dir or url_raw:
        try:
            from tq_vllm.compat import vllm_version
            old = vllm_version() < (0, 32, 0)
        except Exception:
            old = True
        msg = ("the disk/Redis tiers are keyed by vLLM's block hashes, which vLLM 0.26 seeds randomly per process "
               "unless PYTHONHASHSEED is set: start every instance with the same PYTHONHASHSEED (e.g. "
               "PYTHONHASHSEED=0 vllm serve ...); vLLM 0.32+ with the default sha256 hashes needs nothing")
        if os.environ.get("PYTHONHASHSEED") is None:
            rep.add("warning" if old else "info", "hash_seed", msg)
    rep.section("connector", lines)


# ================================================================================================ CLI glue
def add_check_subcommand(sub) -> None:
    p = sub.add_parser("check", help="validate a `vllm serve --config` recipe against a model before launch",
                       description=__doc__.split("\n\n")[0] + " Exit code 0: OK (warnings allowed); 2: errors.")
    p.add_argument("recipes", nargs="+", metavar="RECIPE.yaml", help="recipe file(s)")
    p.add_argument("--model", help="the model (as `vllm serve MODEL --config RECIPE`): overrides the recipe's")
    p.add_argument("--model-config", metavar="CONFIG.json",
                   help="the model's config.json (or its directory); default: the model dir, the HF cache, or "
                        "recipes/models/<name>.json next to the recipe")
    p.add_argument("--gpu-memory-gib", type=float, metavar="N",
                   help="GPU total memory in GiB for the capacity estimate (H100 80GB: 79.2); default: the "
                        "recipe's expect.gpu_memory_gib, else this machine's GPU")
    p.add_argument("--kv-cache-gib", type=float, metavar="N",
                   help="the KV budget directly (CPU: VLLM_CPU_KVCACHE_SPACE) instead of --gpu-memory-gib")
    p.add_argument("--overhead-gib", type=float, default=DEFAULT_OVERHEAD_GIB,
                   help=f"GPU memory that is neither weights nor KV (default {DEFAULT_OVERHEAD_GIB})")
    p.add_argument("--weights-gib", type=float, help="weight memory per GPU instead of the estimate from the config")
    p.add_argument("--no-vllm-parse", action="store_true", help="read the YAML only (no vLLM parser; faster)")
    p.add_argument("--update-expect", action="store_true",
                   help="rewrite the recipe's expected-capacity block with the recomputed numbers")
    p.add_argument("--json", action="store_true", help="one JSON object per recipe")
    p.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    import sys
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    rc = 0
    for recipe in args.recipes:
        try:
            rep = check_recipe(recipe, model=args.model, model_config=args.model_config,
                               gpu_memory_gib=args.gpu_memory_gib, kv_cache_gib=args.kv_cache_gib,
                               overhead_gib=args.overhead_gib, weights_gib=args.weights_gib,
                               use_vllm=not args.no_vllm_parse)
        except CheckUsageError as e:
            print(f"tq-vllm check: {e}", file=sys.stderr)
            rc = 2
            continue
        if args.update_expect:
            if rep.capacity is None or rep.shape is None:
                print(f"tq-vllm check: {recipe}: no capacity to write (fix the errors first; give --gpu-memory-gib "
                      f"or --kv-cache-gib)", file=sys.stderr)
                rc = 2
            else:
                write_expectations(recipe, render_expectations(rep.capacity, rep.shape))
                rep.findings = [f for f in rep.findings if f.code != "expect_drift"]
                print(f"tq-vllm check: {recipe}: expected capacity written")
        if args.json:
            print(json.dumps(rep.to_dict(), default=str))
        else:
            print(rep.render())
        if rep.errors:
            rc = 2
    return rc
