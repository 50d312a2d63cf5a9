"""The training loop: AdamW with warm-up + cosine decay, gradient accumulation, bf16 autocast on GPU,
periodic validation, atomic checkpoints, resume, clean stop on SIGINT/SIGTERM, and expert-load recording.

Under ``torchrun`` (``WORLD_SIZE > 1``) experts are sharded over the ranks (:mod:`moe_trace.expert_parallel`)
and the dense weights are data parallel (DDP); counts are summed over ranks before they are recorded; rank 0
writes the trace, metrics and config, every rank its own checkpoint shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moe_trace import __version__, expert_parallel, expert_placement, memory, optim, profiling, record, trace
from moe_trace.checkpoint import load_checkpoint, save_checkpoint
from moe_trace.data import TokenData, load_data, to_device
from moe_trace.errors import UsageError
from moe_trace.logs import TensorBoardLog
from moe_trace.model import GPT, ModelConfig
from moe_trace.recorder import MetricsLog, Recorder

# The progress bar shows the loss every PROGRESS_EVERY steps, a read of a device value that the step loop makes at
# that fixed cadence: the host runs at most that many steps ahead of the GPU (benchmarks time whole periods of it).
PROGRESS_EVERY = 10
# Router fields of ModelConfig that the trace metadata names, so a trace says how it was balanced.
ROUTER_META = ("score", "balance", "bias_update_rate", "capacity_factor", "shared_experts")


@dataclass
class TrainConfig:
    out: str
    steps: int = 1000
    global_batch: int = 16  # sequences per optimizer step, over all ranks
    micro_batch: int | None = None  # sequences per forward on one rank; default: up to 16k tokens
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 500  # 0: never checkpoint
    flush_every: int = 100
    record: bool = True
    seed: int = 0
    data: str | None = None
    corpus_mb: float = 8.0
    compile: bool = False
    optimizer: str = "auto"  # moe_trace.optim.CHOICES; the run's config.json records what auto chose
    compile_mode: str = "auto"  # torch.compile's mode, or auto (choose_compile_mode); config.json records the one taken
    tensorboard: str | None = None  # TensorBoard log directory
    log_every: int = 10  # steps between TensorBoard scalars
    attention_reason: str = ""  # why the model's attention was chosen (moe_trace.attention_choice)
    placement: str = "static"  # expert placement policy under expert parallelism (placement.policies.ONLINE)
    redundant: int = 0  # spare expert slots over all ranks, for copies of hot experts
    replan_every: int | None = None  # the policy's re-plan cadence (its default if None)
    expert_exchange: str = "auto"  # expert parallelism's token exchange: auto or one of expert_parallel.EXCHANGES
    # DDP's gradient bucket size for the dense parameters under torchrun (None: torch's 25 MB); compiled, the
    # buckets are all-reduced after the backward (expert_parallel.compile_data_parallel keeps the step one graph).
    ddp_bucket_mb: float | None = None
    profile: tuple[int, int] | None = None  # steps [start, stop) to profile into OUT/profile/ (moe_trace.profiling)


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_kind: str) -> tuple[Distributed, torch.device]:
    world = Distributed(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                        int(os.environ.get("WORLD_SIZE", 1)))
    if device_kind == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def _shard(world: Distributed) -> str:
    """A checkpoint's shard name: each rank holds different experts under expert parallelism."""
    return f".rank-{world.rank}" if world.world_size > 1 else ""


# ---------------------------------------------------------------------------------------------------


class _StopRequest:
    """The first SIGINT/SIGTERM becomes a flag checked between steps; a second one stops at once.

    At once: Python runs signal handlers only between bytecodes, so the second signal raises KeyboardInterrupt
    when the main thread next returns from torch (the loop then writes the steps it completed). A single
    kernel can run for minutes (attention over a long sequence on CPU), so a watchdog thread also sees the
    signals, through the interpreter's wakeup file descriptor, and ends the process if the main thread has not
    left this context ``GRACE_S`` seconds after the second one; the trace then ends at its last flush, complete
    and readable like after kill -9.
    """

    GRACE_S = 3.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._left = threading.Event()

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._write_fd, False)
            self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
            threading.Thread(target=self._watch, name="moe-trace-stop", daemon=True).start()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def _watch(self) -> None:
        seen = 0
        try:
            while data := os.read(self._read_fd, 64):  # b"" once __exit__ closes the write end
                seen += sum(byte in self.SIGNALS for byte in data)
                if seen >= 2 and not self._left.wait(self.GRACE_S):
                    os.write(sys.stderr.fileno(), b"moe-trace train: stopped at once by a second signal; the trace "
                                                  b"ends at its last flush, --resume continues from the last "
                                                  b"checkpoint\n")
                    os._exit(130)
        finally:
            os.close(self._read_fd)

    def __exit__(self, *exc: Any) -> None:
        self._left.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous:
            signal.set_wakeup_fd(self._previous_fd)
            os.close(self._write_fd)


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, config: TrainConfig, micro_batch: int, seq_len: int,
             device: torch.device, autocast: contextlib.AbstractContextManager, world: Distributed) -> float:
    """Mean validation cross-entropy over ``eval_batches`` fixed batches of this rank."""
    model.eval()
    losses = []
    for i in range(config.eval_batches):
        x, y = to_device(data.batch("val", config.seed, 0, i, micro_batch, seq_len, world.rank), device)
        with autocast:
            losses.append(model(x, y)[1])
    model.train()
    loss = torch.stack(losses).mean()
    if world.world_size > 1:
        dist.all_reduce(loss)
        loss /= world.world_size
    return loss.item()


def train(model_config: ModelConfig, config: TrainConfig, device_kind: str, resume: bool = False,
          build_model: Callable[[ModelConfig], nn.Module] = GPT) -> dict[str, Any]:
    """Train, record and checkpoint into ``config.out``; return a summary of the run.

    ``build_model`` makes the model from ``model_config`` (default this project's GPT; the command line passes
    :class:`moe_trace.integrations.hf.CausalLM` for ``hf:<family>``): any module with ``forward(idx, targets)
    -> (logits, loss)`` and ``aux_loss()`` whose MoE layers :func:`moe_trace.record.attach` finds.

    A new run that fails (or is interrupted) before it has written a step leaves no run directory behind, so
    that the retry is not refused as "already holds a run".
    """
    caller_group = dist.is_available() and dist.is_initialized()  # a caller's process group is theirs to end
    world, device = _setup_distributed(device_kind)
    run_dir = Path(config.out)
    fresh = world.is_main and not resume and (not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())))
    try:
        return _train(model_config, config, world, device, resume, build_model)
    except BaseException:
        if fresh and run_dir.is_dir() and not (run_dir / "metrics.parquet").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        # Only after _train's model, optimizer and autograd state are freed: with gloo, freeing them once
        # the process group is gone can block (seen in tests/test_expert_parallel.py).
        if world.world_size > 1 and not caller_group:
            dist.destroy_process_group()


def _train(model_config: ModelConfig, config: TrainConfig, world: Distributed, device: torch.device,
           resume: bool, build_model: Callable[[ModelConfig], nn.Module]) -> dict[str, Any]:
    run_dir = Path(config.out)
    if world.world_size > 1 and build_model is not GPT:
        raise UsageError(f"{model_config.name} trains on one process (torchrun's expert parallelism runs the "
                         "GPT presets)")
    _check_run_dir(run_dir, resume)
    micro_batch = micro_batch_size(model_config, config, world.world_size)
    accumulation = config.global_batch // (micro_batch * world.world_size)
    compile_mode = choose_compile_mode(config.compile_mode, device, world.world_size, accumulation, build_model is GPT)
    if config.compile and compile_mode == "reduce-overhead" and accumulation > 1:
        # CUDA graph trees install the backward's output as the first micro-batch's .grad, and the next replay
        # overwrites it: an error, or silently wrong gradients (pytorch/pytorch#169545, open in torch 2.11).
        raise UsageError(f"--compile-mode reduce-overhead needs one micro-batch a step (this run has "
                         f"{accumulation}: CUDA graphs overwrite the accumulated gradients, pytorch/pytorch#169545); "
                         f"use --compile-mode default, or --global-batch {micro_batch * world.world_size}")

    optimizer_name = _choose_optimizer(model_config, config, world, device, sized=build_model is GPT)
    exchange = expert_parallel.choose_exchange(config.expert_exchange, world.world_size, config.compile)
    expert_placement.check_request(config.placement, config.redundant, config.replan_every, world.world_size,
                                   model_config.num_experts, config.record, optimizer_name, exchange)
    if build_model is GPT:  # the estimate knows this project's GPT
        _check_activations(model_config, micro_batch, device, world, optimizer_name)
    data = _load_data_once(model_config, config, world)
    torch.manual_seed(config.seed)
    tokens_per_step = config.global_batch * model_config.seq_len
    placement = expert_placement.PlacementRuntime(
        config.placement, config.redundant, config.replan_every, world.world_size,
        {"model": model_config.name, "moe_layers": model_config.moe_blocks, "num_experts": model_config.num_experts,
         "seq_len": model_config.seq_len, "tokens_per_step": tokens_per_step},
        run_dir, write=world.is_main, dispatch=expert_parallel.DISPATCH[exchange]) if world.world_size > 1 else None
    model = build_model(model_config)
    # Before the move: a rank's GPU never holds all the experts.
    expert_names = _shard_experts(model, world, placement.plan.slot_expert if placement else None, exchange)
    optim.cast_parameters(model, optimizer_name)
    model.to(device)
    optimizer = optim.build(optimizer_name, model, config.lr, config.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, config) / config.lr)
    if placement:
        placement.attach(expert_parallel.expert_layers(model), optimizer)
    start = load_checkpoint(run_dir, model, optimizer, scheduler, _shard(world), placement) if resume else 0
    if resume and start == 0 and world.is_main:
        print(f"--resume: no checkpoint in {run_dir / 'checkpoints'} (the run stopped before its first): starting "
              "again from step 0, discarding the steps recorded so far", file=sys.stderr, flush=True)
    ddp_options = {"bucket_cap_mb": config.ddp_bucket_mb} if config.ddp_bucket_mb else {}
    ddp_model = expert_parallel.data_parallel(model, expert_names, **ddp_options) if world.world_size > 1 else model
    mode = None if compile_mode == "default" else compile_mode
    if not config.compile:
        forward = ddp_model
    elif world.world_size > 1:
        forward = expert_parallel.compile_data_parallel(ddp_model, mode=mode)
    else:
        forward = torch.compile(ddp_model, mode=mode)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    if world.is_main:
        _write_config(run_dir, model_config,
                      dataclasses.replace(config, optimizer=optimizer_name, expert_exchange=exchange,
                                          compile_mode=compile_mode), data, world, device)
    # Hooks on the MoE layers count every training forward (micro-batches sum into the step); the first
    # flush drops any rows a killed run recorded from `start` on.
    board = TensorBoardLog(config.tensorboard, config.log_every) if config.tensorboard and world.is_main else None
    # This project's layers route as model_config says; the trace names the router variant.
    router = ({"expert_ffn": model_config.moe_ffn, **{name: getattr(model_config, name) for name in ROUTER_META}}
              if isinstance(model, GPT) else {})
    recorder = record.attach(model, run_dir, tensorboard=board, meta={
        "model": model_config.name, "tokens_per_step": tokens_per_step, "seq_len": model_config.seq_len,
        "global_batch": config.global_batch, "seed": config.seed, "world_size": world.world_size, **router},
        block=min(25, config.flush_every), flush_every=None,
        write=world.is_main and config.record)
    if placement:
        placement.start(start, recorder)
    # The step's counts for the auxiliary-loss-free bias, on the device (None: the method has no bias).
    bias_counts = (torch.zeros(len(model.moe_layers), model_config.num_experts, dtype=torch.int64, device=device)
                   if isinstance(model, GPT) and model_config.balance == "aux_free" else None)
    metrics = MetricsLog(run_dir / "metrics.parquet", start, write=world.is_main)
    profiler = (profiling.StepProfiler(config.profile, run_dir / "profile", device, world.rank,
                                       world.world_size) if config.profile else None)

    from tqdm import tqdm

    progress = tqdm(total=config.steps, initial=start, unit="step", disable=not world.is_main, dynamic_ncols=True)
    val_loss = float("nan")  # until the first evaluation, which the progress bar waits for before showing it
    step, last_checkpoint, started = start, start, time.perf_counter()
    eval_s = checkpoint_s = 0.0  # time spent outside training steps, reported apart
    last_log = (start, started)  # (first step since the last TensorBoard scalars, its start time)

    def flush_logs() -> None:  # where device values are read: the trace, metrics and TensorBoard scalars
        recorder.flush()
        metrics.flush()
        if board is not None:
            board.flush()

    def flush_and_checkpoint() -> None:
        nonlocal last_checkpoint, checkpoint_s
        flush_logs()
        if (world.is_main or expert_names) and step > last_checkpoint and config.checkpoint_every:
            began = time.perf_counter()
            save_checkpoint(run_dir, step, model, optimizer, scheduler, _shard(world), placement)
            checkpoint_s += time.perf_counter() - began
        last_checkpoint = step

    with _StopRequest() as stop, _kept_on_interrupt(recorder, metrics, world):
        while step < config.steps and not stop.requested:
            step_started, set_apart = time.perf_counter(), eval_s + checkpoint_s
            if profiler:
                profiler.step_begins(step)
            if placement:
                placement.before_step(step, recorder)
            loss_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            logged = board is not None and board.logs(step)
            layer_aux = 0
            for micro in range(accumulation):
                # Micro-batch i of the step's global batch, whichever rank runs it: any world size sees the
                # same data as one process (which expert parallelism's equal-counts promise needs).
                global_micro = world.rank * accumulation + micro
                x, y = to_device(data.batch("train", config.seed, step, global_micro, micro_batch,
                                            model_config.seq_len), device)
                # DDP all-reduces gradients on the last micro-batch only.
                sync = micro == accumulation - 1 or world.world_size == 1
                with (contextlib.nullcontext() if sync else ddp_model.no_sync()), autocast:
                    _, loss = forward(x, y)
                    aux = model.aux_loss()
                ((loss + aux) / accumulation).backward()
                if bias_counts is not None:
                    bias_counts += model.tokens_per_expert()
                loss_sum += loss.detach()
                aux_sum += aux.detach()
                if logged and isinstance(model, GPT):  # transformers families report one aux loss for all layers
                    layer_aux = layer_aux + torch.stack([layer.aux_loss.detach() for layer in model.moe_layers])
            if expert_names:
                expert_parallel.sync_replica_grads(model)
            grad_norm = (expert_parallel.grad_norm(model) if expert_names else torch.nn.utils.get_total_norm(
                [p.grad for p in model.parameters() if p.grad is not None]))
            optim.clip_gradients(optimizer, model.parameters(), config.grad_clip, grad_norm)
            lr = float(scheduler.get_last_lr()[0])  # a float, or a CPU tensor under torchao's adamw8bit: no sync
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if bias_counts is not None:
                if world.world_size > 1:
                    dist.all_reduce(bias_counts)  # every rank takes the same step from the global counts
                model.update_expert_bias(bias_counts)
                bias_counts.zero_()
            if world.world_size > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world.world_size
            recorder.step(step)
            metrics.add(step=step, loss=loss_sum / accumulation, lr=lr, grad_norm=grad_norm,
                        aux_loss=aux_sum / accumulation, step_time_s=time.perf_counter() - step_started,  # for now
                        tokens=tokens_per_step)
            if logged:
                now = time.perf_counter()
                scalars = {"train/loss": loss_sum / accumulation, "train/lr": lr, "train/grad_norm": grad_norm,
                           "train/aux_loss": aux_sum / accumulation,
                           "train/tokens_per_s": (step + 1 - last_log[0]) * tokens_per_step / (now - last_log[1])}
                if isinstance(model, GPT):
                    scalars |= {f"aux_loss/block_{b}": v for b, v in zip(model_config.moe_blocks,
                                                                          layer_aux / accumulation, strict=True)}
                board.add_scalars(step, scalars)
                last_log = (step + 1, now)
            if profiler:
                profiler.step_ends(step)
            step += 1

            if step % config.eval_every == 0 or step == config.steps:
                began = time.perf_counter()
                val_loss = evaluate(model, data, config, micro_batch, model_config.seq_len, device, autocast, world)
                eval_s += time.perf_counter() - began
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                flush_and_checkpoint()
            elif step % config.flush_every == 0:
                flush_logs()
            if world.is_main and (step % PROGRESS_EVERY == 0 or step == config.steps):
                elapsed = time.perf_counter() - started
                progress.set_postfix(loss=f"{metrics.last('loss'):.3f}",
                                     **({} if math.isnan(val_loss) else {"val": f"{val_loss:.3f}"}),
                                     tok_s=f"{(step - start) * tokens_per_step / elapsed:,.0f}", refresh=False)
            progress.update(1)
            # The whole iteration but evaluation and checkpoints: the host runs ahead of the GPU until the progress
            # bar reads the loss (a sync), and the wait there is the GPU's time for the steps queued before it.
            metrics.amend_last(step_time_s=time.perf_counter() - step_started - (eval_s + checkpoint_s - set_apart))
        flush_and_checkpoint()
        recorder.close()
        if profiler:
            profiler.close(step)
    progress.close()
    elapsed = time.perf_counter() - started
    return {
        "run_dir": str(run_dir), "rank": world.rank, "steps": step, "start_step": start,
        "stopped_early": step < config.steps,
        "tokens_per_s": (step - start) * tokens_per_step / elapsed if step > start else float("nan"),
        # How often the run has read its training tokens over, counting every step since step 0.
        "train_tokens": len(data.train), "data_passes": step * tokens_per_step / len(data.train),
        "final_loss": metrics.last("loss") if step > start else float("nan"), "val_loss": val_loss,
        "elapsed_s": elapsed, "eval_s": eval_s, "checkpoint_s": checkpoint_s, "optimizer": optimizer_name,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "placement_plans": [step for step, _ in placement.plans] if placement else None,
    }


def _choose_optimizer(model_config: ModelConfig, config: TrainConfig, world: Distributed,
                      device: torch.device, sized: bool = True) -> str:
    """``--optimizer``, or under ``auto`` the most exact one whose state fits this GPU (float32 AdamW on CPU, and
    for models whose size :mod:`moe_trace.memory` does not estimate, ``sized=False``: the hf:<family> ones)."""
    if device.type != "cuda" or not sized:
        name = "adamw" if config.optimizer == "auto" else config.optimizer
    else:
        name = memory.choose_optimizer(model_config, torch.cuda.get_device_properties(device).total_memory,
                                       world.world_size, config.optimizer, optim.torchao_available())
    optim.check_available(name, device)
    return name


@contextlib.contextmanager
def _kept_on_interrupt(recorder: Recorder, metrics: MetricsLog, world: Distributed):
    """On a second signal's KeyboardInterrupt, write the steps completed so far before stopping (in one process
    only: ranks interrupted at different points would wait on each other's all-reduce)."""
    try:
        yield
    except KeyboardInterrupt:
        if world.world_size == 1:
            recorder.flush()
            metrics.flush()
        raise


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is not a directory")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")


def _check_activations(model_config: ModelConfig, micro_batch: int, device: torch.device, world: Distributed,
                       optimizer_name: str) -> None:
    """Refuse, before anything is loaded or written, a sequence length or micro-batch whose activations cannot
    fit the device beside the training state (on CPU the machine's RAM)."""
    device_bytes = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                    else memory.physical_memory_bytes())
    memory.check_activations_fit(model_config, micro_batch, device_bytes, device.type, world.world_size,
                                 optimizer_name)


def choose_compile_mode(requested: str, device: torch.device, world_size: int, accumulation: int, gpt: bool) -> str:
    """``requested``, or for ``auto``: ``reduce-overhead`` (forward and backward replayed as CUDA graphs) for this
    project's GPT on one GPU with one micro-batch a step, where it was measured 2-4 % faster (gpt-125m-moe at 16k
    tokens on an H200, two runs each: README); else torch.compile's ``default``. Not with gradient accumulation
    (CUDA graph trees overwrite the accumulated gradients, pytorch/pytorch#169545), nor under torchrun (expert
    parallelism's collectives in graphs: unmeasured), nor for transformers models (unmeasured)."""
    if requested != "auto":
        return requested
    one_graph_step = device.type == "cuda" and world_size == 1 and accumulation == 1 and gpt
    return "reduce-overhead" if one_graph_step else "default"


def micro_batch_size(model_config: ModelConfig, config: TrainConfig, world_size: int) -> int:
    """Sequences per forward on one rank: ``--micro-batch``, or the largest divisor of the rank's batch up to 16k
    tokens."""
    per_rank, remainder = divmod(config.global_batch, world_size)
    if remainder:
        raise UsageError(f"--global-batch {config.global_batch} is not divisible by {world_size} ranks")
    micro = config.micro_batch or max(1, min(per_rank, 16384 // model_config.seq_len))
    while per_rank % micro:  # the largest divisor of the per-rank batch not above the request
        micro -= 1
    if config.micro_batch and micro != config.micro_batch:
        raise UsageError(f"--micro-batch {config.micro_batch} does not divide the per-rank batch {per_rank}")
    return micro


def _load_data_once(model_config: ModelConfig, config: TrainConfig, world: Distributed) -> TokenData:
    """Rank 0 builds the tokenizer and token cache; the other ranks wait for it and then read it."""
    def load() -> TokenData:
        return load_data(config.data, model_config.vocab_size, model_config.seq_len,
                         max_corpus_bytes=int(config.corpus_mb * (1 << 20)))

    if world.world_size == 1:
        return load()
    data = load() if world.is_main else None
    dist.barrier()
    return data if data is not None else load()


def _shard_experts(model: GPT, world: Distributed, slot_expert: np.ndarray | None, exchange: str) -> list[str]:
    """Expert parallelism over all ranks (the torch backend's layers) from the placement ``slot_expert``; the
    names of the sharded parameters."""
    if world.world_size == 1:
        return []
    if model.config.moe_backend != "torch":
        raise UsageError("expert parallelism under torchrun runs the torch MoE backend; use --moe-backend torch")
    if model.config.num_experts % world.world_size:
        raise UsageError(f"--experts {model.config.num_experts} does not divide over {world.world_size} ranks")
    return expert_parallel.shard_experts(model, slot_expert, exchange=exchange)


def _write_config(run_dir: Path, model_config: ModelConfig, config: TrainConfig, data: TokenData,
                  world: Distributed, device: torch.device) -> None:
    payload = {
        "model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config),
        "data": {"source": data.source, "tokenizer": str(data.tokenizer_path) if data.tokenizer_path else None,
                 "train_tokens": len(data.train), "val_tokens": len(data.val)},
        "world_size": world.world_size, "device": str(device), "torch": torch.__version__,
        "moe_trace": __version__, "python": sys.version.split()[0],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2) + "\n"
    trace.atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(text))


def read_run_config(run_dir: Path) -> tuple[ModelConfig, TrainConfig]:
    """The model and training settings a run was started with (what ``--resume`` continues)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"--resume: {path} does not exist")
    try:
        payload = json.loads(path.read_text())
        return ModelConfig(**payload["model"]), TrainConfig(**payload["train"])
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise UsageError(f"--resume: {path} is damaged or not a moe-trace run's config ({e})") from None
