"""The one training loop behind `mmchat train pretrain` and `mmchat train sft`.

next-token objective: minimize -sum_t log p(x_t | x_<t) over the target positions that carry loss, averaged over
every such position of the global batch (all micro-batches of all processes), so one process with batch 2B and two
DDP processes with batch B each compute the same gradient.

AdamW, linear warmup then cosine decay, gradient accumulation, clipping, optional bf16 autocast, periodic eval and
samples, TensorBoard, atomic checkpoints with exact resume, Ctrl-C saves and stops, DDP under torchrun.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import MMChatError
from ..quantize import FAST_PATH_MIN_PARAMS, cpu_has_bf16
from .cpu_step import CpuStep, head_nll, keep_freed_memory, use_openblas

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 8          # rows per micro-batch per process
    grad_accum: int = 1          # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-4
    min_lr: float = 3e-5         # the cosine ends here
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0       # 0: off
    eval_every: int = 100        # 0: only at the end
    eval_batches: int = 8
    save_every: int = 200        # 0: only at the end (and on Ctrl-C)
    log_every: int = 1
    seed: int = 1337
    precision: str = "auto"      # fp32, bf16 (autocast), or auto: bf16 where it is faster (use_bf16)
    device: str = "auto"
    progress: bool = True
    stop_at: int = 0             # stop and save after this step, as an interruption would (0: run to max_steps)
    compile: bool = False        # torch.compile each transformer block for the training steps (compile_blocks)
    extra: dict = field(default_factory=dict)

    def lr_at(self, step: int) -> float:
        """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)


# -- files ----------------------------------------------------------------------------------------------------
def atomic_save(obj, path: str | Path):
    """torch.save to a temporary file next to `path`, fsync, then rename over `path`: a crash at any moment leaves
    either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MMChatError(f"no checkpoint at {path}; train first or point at a training output folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise MMChatError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be damaged") from None


# -- memory -------------------------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def estimate_memory(mc, n_params: int, n_trainable: int, cfg: TrainConfig) -> int:
    """Bytes a training step needs, roughly: fp32 weights, then grads and two AdamW moments for the trainable
    parameters, activations kept for backward (~34 d + 5 n_head T values per token per layer), and the logits with
    their softmax and gradient, and under bf16 the frozen weights' bf16 copies. mc: the ModelConfig."""
    tokens = cfg.batch_size * cfg.seq_len
    act_bytes = 2 if cfg.precision == "bf16" else 4
    acts = tokens * mc.n_layer * (34 * mc.d_model + 5 * mc.n_head * cfg.seq_len) * act_bytes
    logits = tokens * mc.vocab_size * 4 * 3
    frozen_copies = 2 * (n_params - n_trainable) if cfg.precision == "bf16" else 0  # FrozenCasts
    return 4 * n_params + 12 * n_trainable + acts + logits + frozen_copies


def check_memory(mc, n_params: int, n_trainable: int, cfg: TrainConfig, device: torch.device):
    """Refuse, before any work, a run that cannot fit in memory."""
    need, have = estimate_memory(mc, n_params, n_trainable, cfg), available_memory(device)
    if need > have:
        raise MMChatError(f"training this model ({n_params / 1e6:.0f}M parameters) with batch {cfg.batch_size} x "
                          f"{cfg.seq_len} needs about {need / 2**30:.1f} GiB but {have / 2**30:.1f} GiB is free; "
                          f"lower --batch-size or --seq-len (--grad-accum keeps the batch), or use --lora")


# -- distributed --------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise MMChatError("--device cuda, but no CUDA device is visible")
        return torch.device("cuda", d.local_rank)
    return torch.device(name)


def use_bf16(precision: str, device: torch.device, n_params: int = 0) -> bool:
    """auto: bf16 autocast on a GPU that has it, and on a CPU with bf16 units (AVX-512 BF16, AMX) for models of
    FAST_PATH_MIN_PARAMS or more, where the GEMMs dominate and run at twice the fp32 rate. CPUs without bf16
    units emulate it slowly, and on small models the casts cost more than they save. Master weights, gradients
    and optimizer state stay fp32 either way."""
    if precision not in ("auto", "fp32", "bf16"):
        raise MMChatError(f"--precision must be auto, fp32 or bf16 (got {precision})")
    if precision == "auto":
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device.type == "cpu" and n_params >= FAST_PATH_MIN_PARAMS and cpu_has_bf16()
    return precision == "bf16"


def compile_blocks(model: torch.nn.Module) -> bool:
    """Regional compilation: torch.compile each transformer block (all blocks share one code path, so it compiles
    once and the other layers reuse it), fusing the elementwise work around the matmuls (norms, RoPE, SwiGLU,
    residual adds) in forward and backward. Inductor's compiled graphs are cached under mmchat's cache folder
    ($TORCHINDUCTOR_CACHE_DIR if set), so later runs of the same shapes skip most of the compile time.
    Returns False for a model without `layers`. Off by default: measured on SmolLM2-135M, batch 4 x 256, 2 threads
    (benchmarks/RESULTS.md), the compiled step was no faster than the eager one (fp32 0.98x, bf16 0.93x) while its
    first step compiles for 15-90 s; the matmuls, not the fused elementwise ops, bound the step there."""
    layers = getattr(model, "layers", None)
    if not layers:
        return False
    from ..registry import home
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(home() / "inductor"))
    for layer in layers:
        layer.compile()
    return True


class ChunkedNLL(torch.autograd.Function):
    """-log softmax(logits)[target] per row, in float32 whatever the logits' dtype, a few rows at a time: never a
    float32 copy of all the logits, of their log-softmax or of its gradient (for 1024 rows of a 49k vocabulary,
    200 MB each), which F.cross_entropy(logits.float()) makes and walks through in memory. Backward rebuilds each
    chunk's softmax from the logits and the saved log-sum-exp. The same values and gradients as that cross entropy
    (within float32 rounding); measured 1.5-2.5x faster for the loss alone on 1024 x 49152 logits (fp32 / bf16)."""

    @staticmethod
    def forward(ctx, logits, targets):  # logits (N, V) float, targets (N,) class ids
        # CPU: ~4 MB of float32 per chunk, which stays in cache; a GPU: large chunks, few kernel launches
        rows = max(1, (1 << (20 if logits.device.type == "cpu" else 26)) // logits.size(1))
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)  # (N,)
        for s in range(0, logits.size(0), rows):
            lse[s:s + rows] = torch.logsumexp(logits[s:s + rows].float(), dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return lse - logits.gather(1, targets[:, None]).squeeze(1).float()  # (N,)

    @staticmethod
    def backward(ctx, grad):  # grad (N,)
        logits, targets, lse = ctx.saved_tensors
        out, rows = torch.empty_like(logits), ctx.rows
        for s in range(0, logits.size(0), rows):
            g = grad[s:s + rows, None]  # (n, 1)
            p = torch.sub(logits[s:s + rows], lse[s:s + rows, None]).exp_().mul_(g)  # softmax * g, (n, V) float32
            out[s:s + rows] = p.scatter_add_(1, targets[s:s + rows, None], -g)  # minus g at the target
        return out, None


class FrozenCasts:
    """bf16 copies of the weights of frozen nn.Linear modules (LoRA's base model and head), made once and swapped
    in for each bf16 forward. Autocast keeps its casts only of weights that require grad, so without these it would
    cast every frozen weight to bf16 again at every forward (read 4 bytes, write 2, per weight); the values are the
    same either way. Outside the forward the modules hold their fp32 weights: state dicts, LoRA merging, fp32
    samples and export never see the copies. A copy is made again when its weight changes (a resume loads new
    values). Costs 2 bytes per frozen weight (see estimate_memory)."""

    def __init__(self, model: torch.nn.Module, dtype=torch.bfloat16):
        self.model, self.dtype = model, dtype
        self.copies: dict = {}  # module -> ((data_ptr, version) of its weight, the bf16 copy)

    def _frozen(self) -> list:
        return [m for m in self.model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
                and m.weight.dtype == torch.float32]

    def _copy(self, m: torch.nn.Linear) -> torch.nn.Parameter:
        w = m.weight
        key = (w.data_ptr(), w._version)
        if m not in self.copies or self.copies[m][0] != key:
            self.copies[m] = (key, torch.nn.Parameter(w.detach().to(self.dtype), requires_grad=False))
        return self.copies[m][1]

    @contextlib.contextmanager
    def swapped(self):
        originals = [(m, m.weight) for m in self._frozen()]
        for m, _ in originals:
            m.weight = self._copy(m)  # backward keeps what forward saved, so only the forward needs the swap
        try:
            yield
        finally:
            for m, w in originals:
                m.weight = w


# -- the loop -----------------------------------------------------------------------------------------------------
class Trainer:
    """Trains `model` on `data` (an object with train_batch(step, micro, n_micro, batch_size, rank, world) and
    eval_batches(n, batch_size), both giving (inputs (B,T), targets (B,T), loss mask (B,T))).

    state_fn / load_state_fn choose what of the model a checkpoint holds (all weights, or only LoRA adapters);
    sample_fn(model) -> str gives text to log; meta is saved in every checkpoint (how to rebuild the model)."""

    def __init__(self, model: torch.nn.Module, data, cfg: TrainConfig, out_dir: str | Path, meta: dict,
                 sample_fn: Callable | None = None, state_fn: Callable | None = None,
                 load_state_fn: Callable | None = None, dist_info: Dist | None = None):
        self.cfg, self.data, self.meta, self.sample_fn = cfg, data, meta, sample_fn
        self.out = Path(out_dir)
        self.d = dist_info or setup_distributed("cuda" if cfg.device in ("auto", "cuda")
                                                and torch.cuda.is_available() else "cpu")
        self.device = resolve_device(cfg.device, self.d)
        self.bf16 = use_bf16(cfg.precision, self.device, sum(p.numel() for p in model.parameters()))
        self.model = model.to(self.device)
        self.frozen_casts = FrozenCasts(model) if self.bf16 else None
        self.compiled = cfg.compile and compile_blocks(model)
        # the float32 CPU step on mmchat's kernels and OpenBLAS where torch's MKL is slower (AMD CPUs): cpu_step.py
        self.cpu_step = CpuStep(model) if use_openblas(self.device, self.bf16, self.compiled) else None
        if self.device.type == "cpu":
            keep_freed_memory()
        self.state_fn = state_fn or (lambda m: m.state_dict())
        self.load_state_fn = load_state_fn or (lambda m, sd: m.load_state_dict(sd))
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise MMChatError("the model has no trainable parameters")
        # weight decay on matrices only, not on norms and biases
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                                     fused=self.device.type in ("cpu", "cuda"))  # one kernel: 4x foreach on CPU
        self.step = 0
        self.history: list[dict] = []  # one entry per step: step, loss, lr, grad_norm
        self.evals: list[dict] = []
        self.stop_requested = False
        self.writer = None
        self.ddp_model = model
        if self.d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.ddp_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- checkpoints ------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def save(self):
        if not self.d.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_save({"step": self.step, "model": self.state_fn(self.model), "optimizer": self.opt.state_dict(),
                     "history": self.history, "evals": self.evals, "meta": self.meta,
                     "train_config": asdict(self.cfg)}, self.checkpoint_path)

    def resume(self) -> bool:
        """Continue from the checkpoint in the output folder, if there is one."""
        if not self.checkpoint_path.exists():
            return False
        ckpt = load_checkpoint_file(self.checkpoint_path)
        self.load_state_fn(self.model, ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step, self.history, self.evals = ckpt["step"], ckpt["history"], ckpt.get("evals", [])
        return True

    # -- pieces -----------------------------------------------------------------------------------------------
    def _eager(self):
        """Evaluation, samples and attention images run the blocks uncompiled: they would each compile graphs of
        their own (no grad, KV-cache decoding) for a handful of calls."""
        return torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext()

    def _autocast(self):
        """bf16 autocast, with the frozen weights' bf16 copies in place (FrozenCasts); nothing for fp32."""
        if not self.bf16:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self.frozen_casts is not None:
            stack.enter_context(self.frozen_casts.swapped())
        return stack

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.d.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def evaluate(self) -> float:
        """Mean loss per target token over the fixed eval batches (every process computes the same)."""
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y, mask in self.data.eval_batches(self.cfg.eval_batches, self.cfg.batch_size):
                x, y, mask = x.to(self.device), y.to(self.device), mask.to(self.device)
                keep = None if mask.all() else mask  # see _nll_sum
                with self._autocast():
                    logits = self.model(x, keep=keep)  # (B, T, V) or (N, V)
                nll = ChunkedNLL.apply(logits.flatten(0, -2), y.flatten() if keep is None else y[keep])  # (N,)
                total += nll.sum().item()
                count += int(mask.sum())
        self.model.train()
        return total / max(count, 1)

    def _log_attention(self, step: int):
        """The last layer's attention weights on an eval row, as an image (needs Pillow)."""
        try:
            import PIL  # noqa: F401  (TensorBoard encodes images with it)
        except ImportError:
            return
        x, _, _ = next(iter(self.data.eval_batches(1, 1)))
        x = x[:, :64].to(self.device)
        self.model.set_reference_attention(True)
        try:
            with torch.no_grad():
                self.model(x)
            w = self.model.layers[-1].attn.last_weights[0, 0].float()  # (T, T), head 0
            self.writer.add_image("attention/last_layer_head0", (w / w.max()).unsqueeze(0).cpu(), step)
        finally:
            self.model.set_reference_attention(False)

    def _on_eval(self, step: int):
        with self._eager():
            return self._eval_and_log(step)

    def _eval_and_log(self, step: int):
        loss = self.evaluate()
        entry = {"step": step, "loss": loss, "ppl": math.exp(min(loss, 50))}
        self.evals.append(entry)
        if self.d.main:
            sample = self.sample_fn(self.model) if self.sample_fn else None
            if self.writer:
                self.writer.add_scalar("eval/loss", loss, step)
                self.writer.add_scalar("eval/perplexity", entry["ppl"], step)
                if sample is not None:
                    self.writer.add_text("samples", sample, step)
                self._log_attention(step)
            msg = f"step {step}: eval loss {loss:.3f}, perplexity {entry['ppl']:.1f}"
            if sample is not None:
                msg += f"\n  sample: {sample[:200]!r}"
            from tqdm import tqdm
            tqdm.write(msg)
        return entry

    # -- fit --------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        cfg = self.cfg
        n_all = sum(p.numel() for p in self.model.parameters())
        check_memory(self.model.cfg, n_all, sum(p.numel() for p in self.params), cfg, self.device)
        if resume and not self.resume() and self.d.main:
            print(f"no checkpoint in {self.out}; starting from scratch")
        elif not resume and self.checkpoint_path.exists():
            raise MMChatError(f"{self.out} already holds a checkpoint; add --resume to continue it or choose "
                              f"another --out")
        if self.d.main:
            from torch.utils.tensorboard import SummaryWriter
            self.out.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step or None)
        previous = self._install_signal_handlers()
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and n_all < 5_000_000:
            torch.set_num_threads(1)  # tiny models: syncing threads costs more than they gain (14x on a busy box)
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="training", unit="step",
                   disable=not (cfg.progress and self.d.main), dynamic_ncols=True)
        self.model.train()
        if self.compiled and self.d.main and self.step < cfg.max_steps:
            tqdm.write("compiling the transformer blocks for training (the first step takes longer; cached for "
                       "later runs)")
        try:
            end = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at else cfg.max_steps
            while self.step < end and not self.stop_requested:
                record = self._train_step(self.step)
                self.history.append(record)
                self.step += 1
                if self.d.main:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if self.writer and self.step % cfg.log_every == 0:
                        for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                            self.writer.add_scalar(f"train/{k}", record[k], record["step"])
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    self._on_eval(self.step)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                self.stop_requested = self._agree_to_stop()
            if self.step < cfg.max_steps:
                self.stop_requested = True  # stopped early (stop_at): a later --resume continues the schedule
            else:
                self._on_eval(self.step)
            self.save()
            if self.stop_requested and self.d.main:
                tqdm.write(f"stopped at step {self.step}; checkpoint saved to {self.checkpoint_path} "
                           f"(continue with --resume)")
        finally:
            bar.close()
            torch.set_num_threads(threads)
            self._restore_signal_handlers(previous)
            if self.writer:
                self.writer.close()
        return {"step": self.step, "history": self.history, "evals": self.evals, "stopped": self.stop_requested}

    def _nll_sum(self, x, y, mask):
        """-sum log p(y | x) over the positions where mask (B, T) bool is true, with gradients. The final norm, the
        head and the loss run only at those positions (in SFT the prompts carry no loss); where every position
        carries loss (pretraining) the model runs as it is, without picking rows. With none, the sum is 0 and every
        parameter still gets its (zero) gradient, as DDP needs: the N = 0 rows stay in the graph."""
        keep = None if mask.all() else mask  # (B, T) bool
        targets = y.flatten() if keep is None else y[keep]  # (N,)
        if self.cpu_step:  # the head and the loss in one function (cpu_step.HeadNLL)
            with self.cpu_step.swapped():
                hidden = self.ddp_model(x, keep=keep, head=False)  # (B, T, d), or (N, d) at the kept positions
            return head_nll(hidden.flatten(0, -2), self.model.lm_head.weight, targets).sum()
        with self._autocast():
            logits = self.ddp_model(x, keep=keep)  # (B, T, V), or (N, V) at the kept positions
        return ChunkedNLL.apply(logits.flatten(0, -2), targets).sum()  # (N,) float32, summed

    def _train_step(self, step: int) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        lr = cfg.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        batches = [self.data.train_batch(step, m, cfg.grad_accum, cfg.batch_size, self.d.rank, self.d.world)
                   for m in range(cfg.grad_accum)]
        # the loss is averaged over every loss-carrying token of the global batch, counted before any backward
        local_count = sum(int(mask.sum()) for _, _, mask in batches)
        global_count = max(1.0, self._all_sum([local_count])[0])
        loss_sum = 0.0
        for m, (x, y, mask) in enumerate(batches):
            x, y, mask = x.to(self.device), y.to(self.device), mask.to(self.device)
            last = m == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.d.world == 1 else self.ddp_model.no_sync()
            with sync:
                nll = self._nll_sum(x, y, mask)
                # DDP averages gradients over processes; multiplying by world turns that into a global sum
                (nll * self.d.world / global_count).backward()
            loss_sum += nll.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss = self._all_sum([loss_sum])[0] / global_count
        tokens = sum(x.numel() for x, _, _ in batches) * self.d.world
        return {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": tokens / (time.perf_counter() - t0)}

    # -- Ctrl-C -----------------------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def request_stop(signum, frame):
            if self.stop_requested:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self.stop_requested = True
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: no handlers, Ctrl-C behaves as usual
            pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous):
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _agree_to_stop(self) -> bool:
        """All processes stop at the same step if any was asked to."""
        if self.d.world == 1:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
