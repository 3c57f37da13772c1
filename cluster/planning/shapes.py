"""Model shapes for the memory planner: the parameter-count fields of a decoder-only `config.json`.

Read from a local directory, a built-in Qwen2.5 table (no network), or the Hugging Face hub's cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The decoder linears a LoRA target name can refer to (HF Llama/Qwen2 naming).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelShapeError(ValueError):
    """A model whose shape cannot be read; the message says what to do."""


@dataclass(frozen=True)
class ModelShape:
    """The parameter-count-relevant fields of a decoder-only HF `config.json` (Llama/Qwen2 layout)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    # Qwen2 has biases on q/k/v (hard-coded in its modeling code); Llama-style configs say
    # `attention_bias`. They stay in the compute dtype under bitsandbytes.
    qkv_bias: bool = False

    @classmethod
    def from_config_dict(cls, d: dict[str, Any]) -> ModelShape:
        """Read a config dict; multimodal wrappers keep the language model under `text_config`.

        Defaults follow transformers: `num_key_value_heads` = heads, `head_dim` = hidden / heads;
        a missing `tie_word_embeddings` counts the lm_head separately (the larger, safer estimate).
        """
        if "hidden_size" not in d and isinstance(d.get("text_config"), dict):
            d = d["text_config"]
        missing = [
            k
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
            )
            if k not in d
        ]
        if missing:
            raise ModelShapeError(f"config.json lacks {', '.join(missing)}: not a decoder-only LM config")
        heads = int(d["num_attention_heads"])
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            vocab_size=int(d["vocab_size"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bool(d.get("attention_bias", d.get("model_type") == "qwen2")),
        )

    @classmethod
    def from_pretrained(cls, model: str) -> ModelShape:
        """Shape of `model`: a local directory's config.json, a built-in Qwen2.5 shape, or the hub's.

        Relative directories are taken from the working directory (resolve config paths first).
        Known Qwen2.5 ids (`Qwen/Qwen2.5-3B-Instruct`) need no network. Otherwise
        `huggingface_hub.hf_hub_download` fetches config.json or reads it from the local cache.
        """
        local = Path(model).expanduser()
        if local.is_dir():
            return cls.from_config_dict(_read_json(local / "config.json"))
        builtin = builtin_shape(model)
        if builtin is not None:
            return builtin
        return cls.from_config_dict(_read_json(hub_config_path(model)))

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def decoder_linear_params(self) -> int:
        """layers * sum(in * out) over q, k, v, o, gate, up, down: the weights NF4 quantizes."""
        return self.num_hidden_layers * sum(n_in * n_out for n_in, n_out in self.linear_shapes().values())

    def dense_params(self) -> int:
        """What stays unquantized: embeddings (x2 unless tied) + RMSNorm weights + q/k/v biases.

        = vocab*h*(1 if tied else 2) + (2*layers + 1)*h + layers*(q_dim + 2*kv_dim if qkv_bias)
        """
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        biases = self.num_hidden_layers * (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return embeddings + norms + biases

    def total_params(self) -> int:
        return self.decoder_linear_params() + self.dense_params()


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> ModelShape:
    return ModelShape(hidden, inter, layers, heads, kv, hidden // heads, vocab, tied, qkv_bias=True)


# Published config.json values. 7B uses a 152064-row embedding (the smaller ones 151936); with it the
# parameter counts equal the published totals: 494,032,768 / 1,543,714,304 / 3,085,938,688 / 7,615,616,512.
QWEN25_SHAPES: dict[str, ModelShape] = {
    "Qwen2.5-0.5B": _qwen25(896, 4864, 24, 14, 2, 151936, tied=True),
    "Qwen2.5-1.5B": _qwen25(1536, 8960, 28, 12, 2, 151936, tied=True),
    "Qwen2.5-3B": _qwen25(2048, 11008, 36, 16, 2, 151936, tied=True),
    "Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4, 152064, tied=False),
}


def builtin_shape(model: str) -> ModelShape | None:
    """`Qwen/Qwen2.5-3B-Instruct` -> QWEN25_SHAPES["Qwen2.5-3B"] (instruct and base share a shape)."""
    name = model.rstrip("/").rsplit("/", 1)[-1].lower().removesuffix("-instruct")
    return next((shape for key, shape in QWEN25_SHAPES.items() if key.lower() == name), None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelShapeError(f"no config.json at {path}: is this a Hugging Face model directory?") from None
    except json.JSONDecodeError as err:
        raise ModelShapeError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelShapeError(f"{path} must hold a JSON object")
    return data


def hub_config_path(model: str) -> Path:
    """config.json of a hub id: the local Hugging Face cache first (no network), else the hub.

    Raises ModelShapeError (saying how to fetch it) when neither has it: offline, no such repo, gated.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelShapeError(
            f"'{model}' is not a local directory and huggingface_hub is not installed to fetch its config.json"
        ) from None
    try:  # the cache answers at once; the hub, offline, only after its retries
        return Path(hf_hub_download(model, "config.json", local_files_only=True))
    except Exception:
        pass
    try:
        _resolve_hub_host()
        return Path(hf_hub_download(model, "config.json"))
    except Exception as err:  # offline and not cached, no such repo, gated: all mean "no config here"
        raise ModelShapeError(
            f"cannot read config.json of '{model}' ({type(err).__name__}): it is not a local directory, "
            f"not in the Hugging Face cache, and the hub did not answer (offline?). Pass a local model "
            f"directory, or fetch it once online: huggingface-cli download {model} config.json"
        ) from None


def _resolve_hub_host() -> None:
    """Raise OSError at once when the hub's host name does not resolve (no network, no DNS).

    huggingface_hub retries a failed request 5 times with backoff (about 23 s measured here) even
    when the name cannot be resolved, which only a network change can fix; other failures (timeouts,
    HTTP errors) keep its retries.
    """
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants
    except ImportError:  # a huggingface_hub without its constants module: leave it to its download
        return
    if constants.HF_HUB_OFFLINE:
        return  # hf_hub_download refuses at once itself
    host = urlparse(constants.ENDPOINT).hostname
    if host:
        socket.getaddrinfo(host, 443)
