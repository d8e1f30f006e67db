"""Model shapes: one dataclass for every architecture mmchat runs, and a registry of named configs."""
from __future__ import annotations

from dataclasses import dataclass, asdict, field


@dataclass
class ModelConfig:
    arch: str = "llama"            # "llama" (RMSNorm, RoPE, SwiGLU) or "gpt2" (LayerNorm, learned positions, GELU)
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3             # grouped-query attention: n_head // n_kv_head query heads share one K/V head
    d_model: int = 576
    d_ff: int = 1536
    max_seq_len: int = 8192
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attn_bias: bool = False        # bias on the Q/K/V projections (GPT-2, Qwen)
    mlp_bias: bool = False         # bias on the MLP and attention output projections (GPT-2)
    head_dim: int = 0              # 0: d_model // n_head
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture '{self.arch}': mmchat runs {', '.join(ARCHITECTURES)}")
        if not self.head_dim:
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_head + 2 * self.n_kv_head) * hd + self.n_head * hd * d
        mlp = (3 if self.arch == "llama" else 2) * d * self.d_ff
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        pos = self.max_seq_len * d if self.arch == "gpt2" else 0
        return self.n_layer * (attn + mlp + 2 * d) + emb + pos + d


ARCHITECTURES = ("llama", "gpt2")

# Named shapes, for training from scratch and for tests. Real checkpoints carry their own config.
CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(arch="llama", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                        max_seq_len=256, name="tiny"),
    "tiny-gpt2": ModelConfig(arch="gpt2", vocab_size=512, n_layer=2, n_head=4, n_kv_head=4, d_model=64, d_ff=256,
                             max_seq_len=256, attn_bias=True, mlp_bias=True, norm_eps=1e-5, name="tiny-gpt2"),
    "small": ModelConfig(arch="llama", vocab_size=49152, n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024,
                         max_seq_len=1024, rope_theta=10000.0, name="small"),
    "gpt2": ModelConfig(arch="gpt2", vocab_size=50257, n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=3072,
                        max_seq_len=1024, attn_bias=True, mlp_bias=True, name="gpt2"),
    "smollm2-135m": ModelConfig(arch="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                                d_ff=1536, max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5,
                                name="smollm2-135m"),
}


def get_config(name: str) -> ModelConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown config '{name}'; known: {', '.join(CONFIGS)}")
    return ModelConfig(**CONFIGS[name].to_dict())
