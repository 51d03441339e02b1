"""A Llama-family decoder written in ``tvm.relax.frontend.nn`` over TVM's paged KV cache.

Covers what Llama 2 / Llama 3 / SmolLM2 need: token embedding, RMSNorm, grouped-query attention
with RoPE (the model's ``rope_theta`` and ``rope_scaling``, applied inside the paged KV cache's
fused-QKV attention, as MLC-LLM's Llama does), SwiGLU MLP, tied or separate ``lm_head``.

Every linear layer (and the embedding, read as the transpose of its own table) is one
``QuantLinear``: a single tensor-expression op whose reduction reads the packed integer weight,
unpacks and scales it in the inner loop, so the compiler emits one fused dequantize-matmul kernel
and a full-precision weight is never materialised (see ``quant.py`` for the storage layout).

Exported functions (``export_tvm``):
    ``prefill(ids[1, n], logit_pos[b], kv, params) -> logits[1, b, V]`` (ragged prefill of
    sequences concatenated; logits only at the ``b`` positions asked for: each sequence's last in
    generation, every scored position in perplexity, so the LM head never runs on context rows);
    ``decode(ids[b, 1], kv, params) -> logits[b, 1, V]``;
    ``create_tir_paged_kv_cache(max_batch, max_total_len, prefill_chunk, page_size, sliding)``.
Logits are float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.mlc import fastmath
from backends.mlc.quant import QuantMode, column_tile

ROW_PAD = 8  # GEMM rows are padded to a multiple of this (schedules.row_tile() divides it)

SUPPORTED_MODEL_TYPES = ("llama",)


class UnsupportedModel(ValueError):
    """The checkpoint's architecture is not one this model definition implements."""


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture numbers the compiled model is specialised to (from ``config.json``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...]
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "LlamaConfig":
        """Read a transformers ``config.json`` dict.

        Raises:
            UnsupportedModel: not a Llama-family config, or one using features not implemented
                (attention/MLP biases, partial rotary, non-SiLU activation).
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model_type {model_type!r} ({', '.join(config.get('architectures') or [])}) is not "
                f"supported; the mlc backend implements {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise UnsupportedModel("Llama with attention/MLP biases is not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {config.get('hidden_act')!r} is not supported (silu only)")
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        scaling = config.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in (None, "default", "llama3"):
            raise UnsupportedModel(f"rope_scaling type {rope_type!r} is not supported (default, llama3)")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=tuple(sorted((k, v) for k, v in scaling.items() if rope_type == "llama3")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def build_model(cfg: LlamaConfig, mode: QuantMode, dtype: str, embed_mode: QuantMode | None = None,
                tile_width: int = 0):
    """The ``nn.Module`` for ``cfg`` with weights in ``mode``, activations and KV cache in ``dtype``
    (``"float32"`` or ``"float16"``); the embedding and ``lm_head`` in ``embed_mode`` (default
    ``mode``, as MLC-LLM quantizes them too); weights stored in column tiles of
    ``column_tile(N, tile_width)`` (``quant.py``; 0 = plain KN). Imports TVM."""
    embed_mode = embed_mode or mode
    from tvm import te, tirx
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import Tensor, op

    # While tracing ``decode`` the linear layers are emitted as "qmv" (rows = batch, usually 1) so
    # the scheduler gives them a GEMV schedule, and the prefill ones as "qmm" (GEMM tiles).
    tracing = {"decode": False}

    def weight_expr(params, k, j, mode):
        """The dequantized weight element ``W[j, k]`` (torch layout), as float32 expression, read
        from the column-tiled storage ``[N // t, rows, t]``."""
        t = int(params[0].shape[2])
        if not mode.quantized:
            return params[0][j // t, k, j % t].astype("float32")
        q, scale = params
        shift = tirx.Cast("uint32", (k % mode.per_word) * mode.bits)
        code = (q[j // t, k // mode.per_word, j % t] >> shift) & tirx.const((1 << mode.bits) - 1, "uint32")
        return (code.astype("float32") - float(mode.max_int)) * scale[j // t, k // mode.group_size, j % t].astype("float32")

    class QuantLinear(nn.Module):
        """``y[n, N] = x[n, K] @ W.T`` with ``W`` stored per ``mode`` (see ``quant.py``)."""

        def __init__(self, in_features: int, out_features: int, wmode: QuantMode = mode):
            self.in_features, self.out_features = in_features, out_features
            self.mode = wmode
            t = column_tile(out_features, tile_width)
            if wmode.quantized:
                (wk, wn), (sk, sn) = wmode.packed_shape(in_features, out_features)
                self.q_weight = nn.Parameter((wn // t, wk, t), "uint32")
                self.q_scale = nn.Parameter((sn // t, sk, t), wmode.scale_dtype)
            else:
                self.weight = nn.Parameter((out_features // t, in_features, t), wmode.scale_dtype)

        def params(self):
            return [self.q_weight, self.q_scale] if self.mode.quantized else [self.weight]

        def forward(self, x: Tensor) -> Tensor:
            lead = list(x.shape[:-1])
            rows = 1
            for dim in lead:
                rows = rows * dim
            x2 = op.reshape(x, [rows, self.in_features])
            kdim, ndim, wmode = self.in_features, self.out_features, self.mode
            block = "qmv" if tracing["decode"] else "qmm"

            def compute(xt, *ps):
                r = te.reduce_axis((0, kdim), name="k")
                n = xt.shape[0]
                weight = lambda k, j: weight_expr(ps, k, j, wmode)  # noqa: E731
                if tile_width == 0 and block == "qmm" and wmode.quantized:
                    # GPU prefill: a dequantize block feeding a plain matmul block (MLC-LLM's
                    # fused dequantize-matmul shape), which dlight's Matmul rule tiles; with the
                    # dequantize inside the reduction only GeneralReduction applied (8B, H100:
                    # 113 -> 1,683 prefill tokens/s). Decode keeps that form: Matmul's tiles
                    # at one row decoded 4.2x slower than GeneralReduction (scripts/mlc_cuda.py)
                    w = te.compute((kdim, ndim), lambda k, j: weight_expr(ps, k, j, wmode).astype(dtype),
                                   name="dequantize")
                    weight = lambda k, j: w[k, j].astype("float32")  # noqa: E731
                # CPU GEMM: rows padded to a multiple of ROW_PAD (the padding rows repeat the last
                # row) so the scheduled row tiles need no bounds check: the dynamic-length
                # predicate in the tile loop halved GEMM speed (notes/tvm-0.27.md)
                padded = block == "qmm" and tile_width > 0
                rows_out = (n + ROW_PAD - 1) // ROW_PAD * ROW_PAD if padded else n
                acc = te.compute(
                    (rows_out, ndim),
                    lambda i, j: te.sum(xt[te.min(i, n - 1) if padded else i, r].astype("float32")
                                        * weight(r, j), axis=r),
                    name=block,
                )
                if dtype == "float32" and not padded:
                    return acc
                return te.compute((n, ndim), lambda i, j: acc[i, j].astype(dtype), name="qmm_out")

            # GPU: no tensor-core rewrite (dlight's MatmulTensorization segfaults in TVM 0.27's Tensorize)
            attrs = {"dlight.do_not_tensorize": True} if tile_width == 0 else None
            y = op.tensor_expr_op(compute, block, [x2, *self.params()], attrs=attrs)
            return op.reshape(y, lead + [ndim])

        def gather_rows(self, ids: Tensor) -> Tensor:
            """Embedding lookup: rows ``W[ids]`` ``[n, in_features]`` of the (vocab-major) table."""
            kdim, wmode = self.in_features, self.mode

            def compute(idt, *ps):
                return te.compute(
                    (idt.shape[0], kdim),
                    lambda i, k: weight_expr(ps, k, idt[i], wmode).astype(dtype),
                    name="embed",
                )

            return op.tensor_expr_op(compute, "embed", [ids, *self.params()])

    def swiglu(gate_up: Tensor) -> Tensor:
        """``silu(gate) * up`` of the fused ``[..., 2I]`` projection, with the polynomial
        ``fastmath.silu`` (TVM's sigmoid is a scalar libm call per element on CPU)."""
        inter = cfg.intermediate_size

        def compute(gu):
            return te.compute(
                (*gu.shape[:-1], inter),
                lambda *i: (fastmath.silu(gu[(*i[:-1], i[-1])].astype("float32"))
                            * gu[(*i[:-1], i[-1] + inter)].astype("float32")).astype(dtype),
                name="swiglu",
            )

        return op.tensor_expr_op(compute, "swiglu", [gate_up])

    class Attention(nn.Module):
        def __init__(self, layer_id: int):
            self.layer_id = layer_id
            heads = cfg.num_attention_heads + 2 * cfg.num_key_value_heads
            self.qkv_proj = QuantLinear(cfg.hidden_size, heads * cfg.head_dim)
            self.o_proj = QuantLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)

        def forward(self, x: Tensor, kv) -> Tensor:
            b, s, _ = x.shape
            heads = cfg.num_attention_heads + 2 * cfg.num_key_value_heads
            qkv = op.reshape(self.qkv_proj(x), (b, s, heads, cfg.head_dim))
            out = kv.attention_with_fused_qkv(
                self.layer_id, qkv, cfg.num_attention_heads, sm_scale=cfg.head_dim ** -0.5
            )
            return self.o_proj(op.reshape(out, (b, s, cfg.num_attention_heads * cfg.head_dim)))

    class MLP(nn.Module):
        def __init__(self):
            self.gate_up_proj = QuantLinear(cfg.hidden_size, 2 * cfg.intermediate_size)
            self.down_proj = QuantLinear(cfg.intermediate_size, cfg.hidden_size)

        def forward(self, x: Tensor) -> Tensor:
            return self.down_proj(swiglu(self.gate_up_proj(x)))

    class Layer(nn.Module):
        def __init__(self, layer_id: int):
            self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
            self.self_attn = Attention(layer_id)
            self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
            self.mlp = MLP()

        def forward(self, x: Tensor, kv) -> Tensor:
            x = x + self.self_attn(self.input_layernorm(x), kv)
            return x + self.mlp(self.post_attention_layernorm(x))

    class LlamaForCausalLM(nn.Module):
        def __init__(self):
            # The embedding table [V, H] is a linear weight with N = V, K = H.
            self.embed_tokens = QuantLinear(cfg.hidden_size, cfg.vocab_size, embed_mode)
            self.layers = nn.ModuleList([Layer(i) for i in range(cfg.num_hidden_layers)])
            self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
            if not cfg.tie_word_embeddings:
                self.lm_head = QuantLinear(cfg.hidden_size, cfg.vocab_size, embed_mode)

        def _head(self, h: Tensor) -> Tensor:
            head = self.embed_tokens if cfg.tie_word_embeddings else self.lm_head
            logits = head(self.norm(h))
            return logits if dtype == "float32" else op.astype(logits, "float32")

        def _body(self, ids: Tensor, kv) -> Tensor:
            b, s = ids.shape
            h = op.reshape(self.embed_tokens.gather_rows(op.reshape(ids, [b * s])), (b, s, cfg.hidden_size))
            for layer in self.layers:
                h = layer(h, kv)
            return h

        def prefill(self, ids: Tensor, logit_pos: Tensor, kv):
            h = self._body(ids, kv)
            last = op.take(h, logit_pos, axis=1)  # [1, b, H]
            return self._head(last), kv

        def decode(self, ids: Tensor, kv):
            tracing["decode"] = True
            try:
                return self._head(self._body(ids, kv)), kv
            finally:
                tracing["decode"] = False

        def create_tir_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size,
                                      page_size, support_sliding_window):
            from tvm import relax
            from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache
            from tvm.target import Target

            return TIRPagedKVCache(
                attn_kind="mha",
                max_batch_size=max_batch_size,
                max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size,
                page_size=page_size,
                support_sliding_window=support_sliding_window,
                layer_partition=relax.ShapeExpr([0, cfg.num_hidden_layers]),
                num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads,
                qk_head_dim=cfg.head_dim,
                v_head_dim=cfg.head_dim,
                mla_original_qk_head_dim=0,
                mla_original_v_head_dim=0,
                rope_mode=RopeMode.NORMAL,
                rope_scale=1,
                rope_theta=cfg.rope_theta,
                rope_scaling=dict(cfg.rope_scaling),
                rope_ext_factors=relax.prim_value(0),
                rotary_dim=cfg.head_dim,
                enable_disaggregation=False,
                dtype=dtype,
                target=Target.current(),
            )

    return LlamaForCausalLM()


def export_spec(dtype: str) -> dict[str, Any]:
    """The ``export_tvm`` spec of ``build_model``'s functions (dynamic batch and lengths)."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

    kv = nn.spec.Object(object_type=PagedKVCache)
    packed = {"param_mode": "packed", "effect_mode": "none"}
    return {
        "prefill": {"ids": nn.spec.Tensor([1, "n"], "int32"), "logit_pos": nn.spec.Tensor(["b"], "int32"),
                    "kv": kv, "$": packed},
        "decode": {"ids": nn.spec.Tensor(["b", 1], "int32"), "kv": kv, "$": packed},
        "create_tir_paged_kv_cache": {
            "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
            "page_size": int, "support_sliding_window": int,
            "$": {"param_mode": "none", "effect_mode": "none"},
        },
    }
