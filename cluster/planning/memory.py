"""GPU memory planner: will this run fit on the device, and what `gpu_memory_utilization` does vLLM get?

Pure arithmetic over a model's `config.json` fields (no weights, no torch), the LoRA settings and the
batch shape. Every figure is an integer number of bytes with its formula in the docstring of the
function that computes it, derived from what this project's code allocates:

learner (QLoRA, `learner/model.py`, `learner/logprobs.py`): NF4 decoder linears (bitsandbytes layout),
dense embeddings/norms/biases in the compute dtype, LoRA weights + grads + AdamW moments (all fp32:
the learner keeps LoRA params in fp32, since a bf16 AdamW step on them rounds small updates away, and
torch's AdamW allocates its moments with `zeros_like(param)`), activations saved for backward, the
logits path, a fixed CUDA context + slack.

rollout (vLLM): all parameters dense in the rollout dtype, the KV cache for every concurrent
sequence at full length, the engine's profiling headroom, its CUDA context.

Placement:
- `split`: learner and engine on separate devices; each must fit the device on its own.
- `colocate`: one device, two phases. Train: the learner peak + the sleeping engine's residue
  (sleep level 1 offloads weights to CPU and drops the KV cache; its CUDA context stays).
  Generate: the awake engine + the learner's resident state (weights, LoRA, grads, AdamW state,
  context) — this assumes the learner calls `torch.cuda.empty_cache()` after its step, or torch's
  caching allocator keeps the whole training peak reserved and vLLM cannot wake up.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.config import RunConfig

GiB = 2**30
MiB = 2**20

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# bitsandbytes 4-bit layout (`bnb.functional.quantize_4bit`): two 4-bit codes per byte; one fp32
# absmax per block of 64 weights (0.5 bit/param). With double quantization (`compress_statistics`)
# the absmax are stored as uint8 and quantized blockwise with one fp32 scale per 256 absmax:
# 8/64 + 32/(64*256) = 0.127 bit/param, so 4.127 bits/param in all (4.5 without).
# Per-tensor constants (the 16-entry NF4 code, the 256-entry nested code, one offset) are < 1.2 KiB
# per linear and left out.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256

# A CUDA context with cuBLAS handles and workspaces: ~300-500 MiB per process on CUDA 12 with lazy
# module loading; 512 MiB is the allowance. The learner and the engine are separate processes
# (Ray actors), so each pays one.
CUDA_CONTEXT_BYTES = 512 * MiB
# Learner-side slack for the caching allocator's fragmentation (blocks of freed activations that
# cannot be reused for a differently shaped request) and transient autograd buffers not modelled.
LEARNER_SLACK_BYTES = 512 * MiB

# vLLM sizes its KV cache as `gpu_memory_utilization * device - weights - profiled peak`; the profile
# run is a forward over `max_num_batched_tokens` tokens plus a dummy sampler step over
# `max_num_seqs` rows. This project leaves both unset, so vLLM 0.32's defaults for the offline `LLM`
# class apply (vllm/engine/arg_utils.py): 8192 tokens / 256 seqs under 70 GiB of device memory,
# 16384 / 1024 above (H100, H200; A100-80GB keeps the small ones, not modelled).
VLLM_PROFILE_DEFAULTS = ((70 * GiB, 16384, 1024), (0, 8192, 256))  # (min device bytes, tokens, seqs)
# The sampler step holds fp32 logits, probs and logprobs for each row: 3 x 4 bytes per vocab entry.
VLLM_SAMPLER_COPIES = 3
# CUDA-graph memory pool when `enforce_eager` is off: vLLM logs 0.3-1 GiB for 0.5B-8B models.
CUDA_GRAPH_BYTES = 1 * GiB

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
        return cls.from_config_dict(_read_json(_download_config(model)))

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


def _download_config(model: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelShapeError(
            f"'{model}' is not a local directory and huggingface_hub is not installed to fetch its config.json"
        ) from None
    try:
        return Path(hf_hub_download(model, "config.json"))
    except Exception as err:  # offline and not cached, no such repo, gated: all mean "no config here"
        raise ModelShapeError(
            f"cannot read config.json of '{model}' ({type(err).__name__}): it is not a local directory, "
            f"not in the Hugging Face cache, and the hub did not answer (offline?). Pass a local model "
            f"directory, or fetch it once online: huggingface-cli download {model} config.json"
        ) from None


@dataclass(frozen=True)
class MemoryInputs:
    """Everything the estimate depends on; `inputs_from_config` fills it from a RunConfig."""

    shape: ModelShape
    quantization: str  # "nf4" | "none"
    double_quant: bool
    compute_bytes: int  # learner compute dtype: LoRA weights, dense weights, activations
    rollout_bytes: int  # vLLM dtype: its weights and KV cache
    lora_rank: int
    lora_targets: list[str]
    micro_batch_size: int
    max_prompt_tokens: int
    max_new_tokens: int
    gradient_checkpointing: bool
    rollout_sequences: int  # concurrent sequences one engine holds (prompts per engine x group)
    device_bytes: int
    placement: str  # "colocate" | "split"
    enforce_eager: bool = True  # False: vLLM captures CUDA graphs (CUDA_GRAPH_BYTES more)
    worker_base_on_device: bool = False  # sync: worker_merge with rollout.worker_merge_base: device

    def __post_init__(self) -> None:
        if self.quantization not in ("nf4", "none"):
            raise ValueError(f"quantization must be 'nf4' or 'none', got {self.quantization!r}")
        if self.placement not in ("colocate", "split"):
            raise ValueError(f"placement must be 'colocate' or 'split', got {self.placement!r}")
        counts = (
            "micro_batch_size",
            "max_prompt_tokens",
            "max_new_tokens",
            "rollout_sequences",
            "device_bytes",
        )
        small = [name for name in counts if getattr(self, name) < 1]
        if small:
            raise ValueError(f"{', '.join(small)} must be at least 1")
        unknown = sorted(set(self.lora_targets) - set(LINEAR_NAMES))
        if unknown:
            raise ValueError(
                f"cannot size LoRA on {unknown}: the planner knows the decoder linears {list(LINEAR_NAMES)}"
            )

    @property
    def sequence_tokens(self) -> int:
        """L: the longest prompt + completion."""
        return self.max_prompt_tokens + self.max_new_tokens


# ---- learner -------------------------------------------------------------------------------------


def nf4_tensor_bytes(n: int, double_quant: bool) -> int:
    """One NF4 weight of n params: ceil(n/2) packed bytes + its quantization constants.

    blocks = ceil(n/64); constants = 4*blocks (fp32 absmax), or with double quantization
    blocks (uint8 absmax) + 4*ceil(blocks/256) (fp32 second-level scales).
    """
    blocks = math.ceil(n / NF4_BLOCK)
    constants = blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) if double_quant else 4 * blocks
    return math.ceil(n / 2) + constants


def nf4_weight_bytes(shape: ModelShape, double_quant: bool) -> int:
    """layers * sum over the 7 decoder linears of nf4_tensor_bytes(in * out)."""
    per_layer = sum(nf4_tensor_bytes(a * b, double_quant) for a, b in shape.linear_shapes().values())
    return shape.num_hidden_layers * per_layer


def lora_params(shape: ModelShape, rank: int, targets: list[str]) -> int:
    """layers * sum over adapted linears of r * (in + out)  (A is r x in, B is out x r)."""
    shapes = shape.linear_shapes()
    return shape.num_hidden_layers * sum(rank * sum(shapes[name]) for name in set(targets))


def layer_activation_bytes_per_token(shape: ModelShape, c: int, rank: int, adapted: int) -> int:
    """Bytes one decoder layer keeps for backward, per token (frozen base, trainable LoRA, c-byte dtype).

    = 2 * (4h + 4)     two RMSNorms save their fp32 input and fp32 rsqrt (the frozen weight-multiply
                       saves only the weight)
    + 2 * c*h          the normed inputs, saved once by the LoRA A of q/k/v and of gate/up (the bnb
                       4-bit matmul saves no input: its weight is frozen)
    + 5 * c*q_dim      rotated q; k and v expanded by repeat_kv to q_dim (a padding mask turns off
                       SDPA's native GQA); the SDPA output; the o_proj input (a contiguous copy)
    + 4 * heads        SDPA's fp32 logsumexp; the L x L scores are never stored (flash/mem-efficient)
    + 4 * c*i          gate output (SiLU input), SiLU output, up output, their product (down input)
    + adapted * c*r    each LoRA B's input (A's output); dropout 0 keeps no mask

    Korthikanti et al. 2022 ("Reducing Activation Recomputation") count 34*h*c/2 + 5*heads*L for a
    GPT layer with dropout, a 4h GeLU MLP and stored attention scores; this is the same bookkeeping
    for this model family as it runs here (SwiGLU, GQA, no dropout, fused attention).
    """
    h, q, i = shape.hidden_size, shape.q_dim, shape.intermediate_size
    return (
        2 * (4 * h + 4)
        + 2 * c * h
        + 5 * c * q
        + 4 * shape.num_attention_heads
        + 4 * c * i
        + adapted * c * rank
    )


def activation_bytes(inputs: MemoryInputs) -> int:
    """Saved activations of one micro-batch of B sequences of length L (tokens = B*L).

    no checkpointing: tokens * layers * per_layer
    checkpointing:    tokens * (layers * c*h + per_layer)   (each layer's input is kept; one layer is
                      recomputed at a time in backward)
    + tokens * (4h + 4)  the final RMSNorm (outside the checkpointed layers)
    + the largest decoder linear dequantized to the compute dtype (NF4: bnb materialises each weight
      for its matmul, forward and backward, one at a time)
    """
    shape, c = inputs.shape, inputs.compute_bytes
    tokens = inputs.micro_batch_size * inputs.sequence_tokens
    per_layer = layer_activation_bytes_per_token(shape, c, inputs.lora_rank, len(set(inputs.lora_targets)))
    layers = shape.num_hidden_layers
    stored = (
        layers * c * shape.hidden_size + per_layer if inputs.gradient_checkpointing else layers * per_layer
    )
    final_norm = 4 * shape.hidden_size + 4
    dequantized = (
        max(a * b for a, b in shape.linear_shapes().values()) * c if inputs.quantization == "nf4" else 0
    )
    return tokens * (stored + final_norm) + dequantized


def logits_bytes(inputs: MemoryInputs) -> int:
    """Peak of the logits path in `learner/logprobs.py` for one micro-batch: B * V * (c*L + 24*T).

    c*B*L*V   the lm_head output over the whole sequence (alive until the completion slice is taken)
    4*B*T*V   the completion slice upcast to fp32 and divided by the temperature (T = max_new_tokens)
    4*B*T*V   log_softmax output, saved for backward
    16*B*T*V  the entropy metric (`entropy_from_logits`): log p, p, the masked log p and p * log p, all
              fp32 and alive at once. Chunking that metric over T would remove this term.
    Backward needs less: 12*B*T*V + c*B*L*V while the forward's 16*B*T*V is gone.
    """
    b, v = inputs.micro_batch_size, inputs.shape.vocab_size
    return b * v * (inputs.compute_bytes * inputs.sequence_tokens + 24 * inputs.max_new_tokens)


LORA_BYTES = 4  # fp32 adapter weights (and so fp32 grads and AdamW moments)


def learner_components(inputs: MemoryInputs) -> dict[str, int]:
    """Bytes per learner component at its training peak (end of a micro-batch's forward)."""
    shape, c = inputs.shape, inputs.compute_bytes
    nf4 = inputs.quantization == "nf4"
    dense_params = shape.dense_params() + (0 if nf4 else shape.decoder_linear_params())
    lora = lora_params(shape, inputs.lora_rank, inputs.lora_targets)
    return {
        "nf4_weights": nf4_weight_bytes(shape, inputs.double_quant) if nf4 else 0,
        "dense_weights": dense_params * c,
        "lora": lora * LORA_BYTES,  # learner/model.py keeps the LoRA params in fp32
        "grads": lora * LORA_BYTES,  # same dtype as the params; kept until the next zero_grad
        "optimizer": 2 * lora * LORA_BYTES,  # torch AdamW: exp_avg, exp_avg_sq = zeros_like(param)
        "activations": activation_bytes(inputs),
        "logits": logits_bytes(inputs),
        "overhead": CUDA_CONTEXT_BYTES + LEARNER_SLACK_BYTES,
    }


_RESIDENT = ("nf4_weights", "dense_weights", "lora", "grads", "optimizer", "overhead")


def learner_resident(learner: dict[str, int]) -> int:
    """What the learner keeps on the device between steps: everything but activations and logits."""
    return sum(learner[k] for k in _RESIDENT)


# ---- rollout -------------------------------------------------------------------------------------


def kv_cache_bytes(shape: ModelShape, dtype_bytes: int, sequences: int, tokens_per_sequence: int) -> int:
    """2 (K, V) * layers * kv_heads * head_dim * bytes * sequences * tokens.

    Every concurrent sequence at full length: an upper bound, as prefix caching shares a group's
    prompt blocks, and vLLM queues (does not fail) when fewer blocks are free.
    """
    per_token = 2 * shape.num_hidden_layers * shape.kv_dim * dtype_bytes
    return per_token * sequences * tokens_per_sequence


def vllm_profile_sizes(device_bytes: int) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) vLLM defaults to on a device of this size."""
    return next((tokens, seqs) for floor, tokens, seqs in VLLM_PROFILE_DEFAULTS if device_bytes >= floor)


def vllm_headroom_bytes(shape: ModelShape, dtype_bytes: int, enforce_eager: bool, device_bytes: int) -> int:
    """What vLLM's profile run charges inside its budget besides weights and KV cache.

    = tokens * bytes * (2h + 3i)   forward peak at the MLP over max_num_batched_tokens: hidden +
                                   residual, fused gate_up output (2i) and its SiLU-and-mul (i)
    + seqs * V * 4 * 3             dummy sampler step over max_num_seqs rows: fp32 logits, probs, logprobs
    + CUDA_GRAPH_BYTES unless enforce_eager
    """
    tokens, seqs = vllm_profile_sizes(device_bytes)
    forward = tokens * dtype_bytes * (2 * shape.hidden_size + 3 * shape.intermediate_size)
    sampler = seqs * shape.vocab_size * 4 * VLLM_SAMPLER_COPIES
    return forward + sampler + (0 if enforce_eager else CUDA_GRAPH_BYTES)


FUSED_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # vLLM's qkv_proj, gate_up_proj


def base_layer_bytes(
    shape: ModelShape, names: set[str], quantization: str, double_quant: bool, c: int
) -> int:
    """The base of these decoder linears, in every layer, as the learner stores it (c: its dtype):

    = layers * sum over them of nf4_tensor_bytes(in * out)   (NF4; dense: in*out*c)
    + layers * (q_dim + 2*kv_dim) * c   the q/k/v biases, when q_proj is among them
    """
    shapes = shape.linear_shapes()
    if quantization == "nf4":
        per_layer = sum(nf4_tensor_bytes(a * b, double_quant) for n, (a, b) in shapes.items() if n in names)
    else:
        per_layer = sum(a * b * c for n, (a, b) in shapes.items() if n in names)
    if shape.qkv_bias and "q_proj" in names:
        per_layer += (shape.q_dim + 2 * shape.kv_dim) * c
    return shape.num_hidden_layers * per_layer


def fused_closure(targets: list[str]) -> set[str]:
    """The adapted linears plus their vLLM fusion siblings (q_proj -> q, k, v; gate -> gate, up)."""
    names = set(targets)
    for group in FUSED_LINEARS:
        if names & set(group):
            names |= set(group)
    return names


def worker_packed_base_bytes(inputs: MemoryInputs) -> int:
    """sync: worker_merge keeps, next to its engine, the base of every layer it rebuilds each sync
    (the adapted linears closed under vLLM's fusion): base_layer_bytes of those. 0 unless the base
    is kept on the engine's device (`worker_base_on_device`)."""
    if not inputs.worker_base_on_device:
        return 0
    names = fused_closure(inputs.lora_targets)
    return base_layer_bytes(
        inputs.shape, names, inputs.quantization, inputs.double_quant, inputs.compute_bytes
    )


def rollout_components(inputs: MemoryInputs) -> dict[str, int]:
    """Bytes per engine component: the engine runs merged dense weights, so all params count."""
    shape, r = inputs.shape, inputs.rollout_bytes
    return {
        "weights": shape.total_params() * r,
        "packed_base": worker_packed_base_bytes(inputs),  # outside vLLM's fraction, like the context
        "kv_cache": kv_cache_bytes(shape, r, inputs.rollout_sequences, inputs.sequence_tokens),
        "headroom": vllm_headroom_bytes(shape, r, inputs.enforce_eager, inputs.device_bytes),
        "context": CUDA_CONTEXT_BYTES,  # outside gpu_memory_utilization: vLLM measures after creating it
    }


# ---- plan ----------------------------------------------------------------------------------------


def phase_bytes(inputs: MemoryInputs, learner: dict[str, int], rollout: dict[str, int]) -> dict[str, int]:
    """Device bytes in use per phase; the plan fits when every phase fits the device.

    colocate: train    = learner total + the sleeping engine's context + a worker_merge packed base
                         (level-1 sleep frees the rest)
              generate = engine total + learner resident state
    split:    train    = learner total (its own device); generate = engine total (its own device)
    """
    learner_total, rollout_total = sum(learner.values()), sum(rollout.values())
    if inputs.placement == "split":
        return {"train": learner_total, "generate": rollout_total}
    return {
        # vLLM's sleep does not free a worker_merge base: it is the worker's own tensors
        "train": learner_total + rollout["context"] + rollout["packed_base"],
        "generate": rollout_total + learner_resident(learner),
    }


@dataclass(frozen=True)
class MemoryPlan:
    learner: dict[str, int]
    rollout: dict[str, int]
    learner_total: int
    rollout_total: int
    peak: int
    device_bytes: int
    gpu_memory_utilization: float
    fits: bool
    advice: list[str]
    placement: str = "colocate"
    phases: dict[str, int] = field(default_factory=dict)

    def render(self) -> str:
        """A budget table in GiB: learner and vLLM columns, the phases, peak vs device, the verdict."""
        lines = [f"memory plan ({self.placement}, device {_gib(self.device_bytes)} GiB)"]
        lines.append(f"  {'GiB':<22}{'learner':>9}{'vLLM':>9}")
        for label, lkey, rkey in _ROWS:
            if rkey == "packed_base" and not self.rollout.get(rkey):
                continue  # only sync: worker_merge keeps a base next to the engine
            left = _gib(self.learner[lkey]) if lkey else ""
            right = _gib(self.rollout[rkey]) if rkey else ""
            lines.append(f"  {label:<22}{left:>9}{right:>9}")
        lines.append(f"  {'total':<22}{_gib(self.learner_total):>9}{_gib(self.rollout_total):>9}")
        lines += self._phase_lines()
        verdict = "fits" if self.fits else "does NOT fit"
        spare = self.device_bytes - self.peak
        margin = f"{_gib(spare)} GiB spare" if spare >= 0 else f"{_gib(-spare)} GiB over"
        lines.append(
            f"  peak {_gib(self.peak)} of {_gib(self.device_bytes)} GiB "
            f"({100 * self.peak / self.device_bytes:.0f}%): {verdict}, {margin}; "
            f"vLLM gpu_memory_utilization = {self.gpu_memory_utilization:.3f}"
        )
        lines += [f"  - {item}" for item in self.advice]
        return "\n".join(lines)

    def _phase_lines(self) -> list[str]:
        train, generate = self.phases["train"], self.phases["generate"]
        if self.placement == "split":
            return [
                f"  learner device : {_gib(train)} GiB",
                f"  engine device  : {_gib(generate)} GiB (each engine on its own device)",
            ]
        resident = learner_resident(self.learner)
        return [
            f"  train phase    : learner {_gib(self.learner_total)} + vLLM asleep "
            f"{_gib(self.rollout['context'])} = {_gib(train)} GiB",
            f"  generate phase : vLLM {_gib(self.rollout_total)} + learner resident {_gib(resident)} "
            f"= {_gib(generate)} GiB",
        ]


_ROWS: list[tuple[str, str | None, str | None]] = [
    ("nf4 base weights", "nf4_weights", None),
    ("dense weights", "dense_weights", "weights"),
    ("packed base (worker)", None, "packed_base"),
    ("lora adapter", "lora", None),
    ("lora grads", "grads", None),
    ("adamw state", "optimizer", None),
    ("activations", "activations", None),
    ("logits", "logits", None),
    ("kv cache", None, "kv_cache"),
    ("vllm profile headroom", None, "headroom"),
    ("cuda context + slack", "overhead", "context"),
]


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def plan_memory(inputs: MemoryInputs) -> MemoryPlan:
    """The budget, the verdict, and (when it does not fit) which knobs free how much."""
    learner, rollout = learner_components(inputs), rollout_components(inputs)
    by_phase = phase_bytes(inputs, learner, rollout)
    peak = max(by_phase.values())
    fits = peak <= inputs.device_bytes
    return MemoryPlan(
        learner=learner,
        rollout=rollout,
        learner_total=sum(learner.values()),
        rollout_total=sum(rollout.values()),
        peak=peak,
        device_bytes=inputs.device_bytes,
        gpu_memory_utilization=vllm_utilization(rollout, inputs.device_bytes),
        fits=fits,
        advice=[] if fits else advice(inputs, by_phase),
        placement=inputs.placement,
        phases=by_phase,
    )


def vllm_utilization(rollout: dict[str, int], device_bytes: int) -> float:
    """(weights + KV cache + headroom) / device, rounded up to 0.001 so the planned KV cache fits.

    The context is left out: vLLM takes its baseline after creating it.
    """
    budget = rollout["weights"] + rollout["kv_cache"] + rollout["headroom"]
    return math.ceil(1000 * budget / device_bytes) / 1000


# ---- advice --------------------------------------------------------------------------------------


def _phases_of(inputs: MemoryInputs) -> dict[str, int]:
    return phase_bytes(inputs, learner_components(inputs), rollout_components(inputs))


def advice(inputs: MemoryInputs, by_phase: dict[str, int]) -> list[str]:
    """Knobs for each phase over the device, each with the bytes it frees."""
    items: list[str] = []
    if by_phase["train"] > inputs.device_bytes:
        items += _train_advice(inputs, by_phase["train"])
    if by_phase["generate"] > inputs.device_bytes:
        items += _generate_advice(inputs, by_phase["generate"])
    return items


def _train_advice(inputs: MemoryInputs, train: int) -> list[str]:
    device = inputs.device_bytes
    items = [f"the training phase needs {_gib(train)} GiB of {_gib(device)}"]
    checkpointed = replace(inputs, gradient_checkpointing=True)
    if not inputs.gradient_checkpointing:
        saved = train - _phases_of(checkpointed)["train"]
        items.append(
            f"turn on learner.gradient_checkpointing, with learner.share_prompt_forward off "
            f"(saves {_gib(saved)} GiB of activations)"
        )
    micro = _largest_fitting_micro(inputs)
    if inputs.micro_batch_size > 1:
        target = micro or 1
        saved = train - _phases_of(replace(inputs, micro_batch_size=target))["train"]
        alone = "" if micro else "; not enough on its own"
        items.append(
            f"lower learner.micro_batch_size from {inputs.micro_batch_size} to {target} "
            f"(saves {_gib(saved)} GiB{alone})"
        )
    if not inputs.gradient_checkpointing and micro is None:
        both = _largest_fitting_micro(checkpointed)
        if both:
            items.append(f"with gradient_checkpointing on, micro_batch_size {both} fits")
    items.append(
        f"the logits path takes {_gib(logits_bytes(inputs))} GiB (micro-batch {inputs.micro_batch_size} x "
        f"vocab {inputs.shape.vocab_size} x {inputs.max_new_tokens} new tokens, mostly fp32): it shrinks "
        f"with rollout.sampling.max_new_tokens and micro_batch_size"
    )
    if inputs.quantization == "none":
        saved = train - _phases_of(replace(inputs, quantization="nf4"))["train"]
        items.append(f"set learner.quantization: nf4 (saves {_gib(saved)} GiB)")
    return items


def _largest_fitting_micro(inputs: MemoryInputs) -> int | None:
    """Largest divisor of the micro-batch size (so it still divides the step's sequences) that fits."""
    for size in range(inputs.micro_batch_size - 1, 0, -1):
        smaller = replace(inputs, micro_batch_size=size)
        if inputs.micro_batch_size % size == 0 and _phases_of(smaller)["train"] <= inputs.device_bytes:
            return size
    return None


def _generate_advice(inputs: MemoryInputs, generate: int) -> list[str]:
    device = inputs.device_bytes
    kv = kv_cache_bytes(inputs.shape, inputs.rollout_bytes, inputs.rollout_sequences, inputs.sequence_tokens)
    per_sequence = kv // inputs.rollout_sequences
    room = device - (generate - kv)
    items = [
        f"the generation phase needs {_gib(generate)} GiB of {_gib(device)}, "
        f"{_gib(kv)} GiB of it KV cache for {inputs.rollout_sequences} sequences x {inputs.sequence_tokens} tokens"
    ]
    if room >= per_sequence:
        items.append(
            f"lower prompts_per_step (or group_size) so one engine holds at most {room // per_sequence} "
            f"sequences (prompts per engine x group_size), or lower rollout.sampling.max_new_tokens / "
            f"data.max_prompt_tokens (KV cache {per_sequence / MiB:.1f} MiB per sequence)"
        )
    else:
        items.append(
            f"the engine's weights and headroom alone leave no room for one sequence's KV cache "
            f"({_gib(max(room, 0))} GiB free): use a smaller model or more devices"
        )
    if inputs.placement == "colocate":
        items.append("or use placement: split (learner and engine on separate GPUs)")
    return items


# ---- from a run config ---------------------------------------------------------------------------


def inputs_from_config(cfg: RunConfig, shape: ModelShape, device_gib: float = 24.0) -> MemoryInputs:
    """MemoryInputs for a validated RunConfig on devices of `device_gib` GiB each.

    One engine holds ceil(prompts_per_step / num_workers) prompts x group_size sequences at once.
    """
    learner, rollout = cfg.learner, cfg.rollout
    prompts_per_engine = math.ceil(cfg.prompts_per_step / rollout.num_workers)
    return MemoryInputs(
        shape=shape,
        quantization=learner.quantization,
        double_quant=learner.double_quant,
        compute_bytes=DTYPE_BYTES[learner.compute_dtype],
        rollout_bytes=DTYPE_BYTES[rollout.dtype],
        lora_rank=learner.lora.rank,
        lora_targets=learner.lora.module_names(),
        micro_batch_size=learner.micro_batch_size,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_new_tokens=rollout.sampling.max_new_tokens,
        gradient_checkpointing=learner.gradient_checkpointing,
        rollout_sequences=prompts_per_engine * cfg.group_size,
        device_bytes=int(device_gib * GiB),
        placement=cfg.placement,
        enforce_eager=rollout.enforce_eager,
        worker_base_on_device=cfg.sync == "worker_merge" and rollout.worker_merge_base == "device",
    )
