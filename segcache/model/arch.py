"""Hyper-parameters of a Llama-family model (Llama, Mistral, Qwen2, SmolLM). Stdlib only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_position: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict ({"rope_type": "llama3", "factor": ...}) or None.
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    tie_embeddings: bool = True
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def prefill_flops(self, n: int, start: int) -> float:
        """Arithmetic (2 x multiply-adds) of prefilling ``n`` tokens after ``start``
        cached ones: every projection, and attention of token i to its
        ``start + i + 1`` slots (the LM head, once per chunk, left out)."""
        d = self.hidden_size
        linear = 2 * self.n_layers * d * (2 * self.q_dim + 2 * self.kv_dim + 3 * self.intermediate_size)
        attention = 4 * self.n_layers * self.n_heads * self.head_dim
        return n * linear + attention * (n * start + n * (n + 1) / 2)

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes of K and V for one token over all layers."""
        return self.n_layers * 2 * self.kv_dim * element_size

    # --- Hugging Face config.json round trip -------------------------------------------
    def to_hf_config(self) -> dict[str, Any]:
        arch = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(
            self.architecture, "LlamaForCausalLM"
        )
        return {
            "architectures": [arch],
            "model_type": self.architecture if self.architecture in ("qwen2", "mistral") else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.qkv_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArch:
        model_type = cfg.get("model_type", "llama")
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):
            rope_theta = cfg["rope_parameters"].get("rope_theta")
            rp = {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
            if rp.get("rope_type", "default") != "default":
                rope_scaling = rp
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            max_position=cfg.get("max_position_embeddings", 4096),
            rms_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=model_type,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
