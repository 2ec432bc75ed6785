"""The training engine shared by `nvit.prune` and `nvit.pretrain`: processes (torchrun / DDP), precision
(torch.amp), optimizer groups, the distillation step, sharded evaluation and checkpoints.

One process (``python -m …``) or many (``torchrun --nproc-per-node N -m …``; multi-node too): the
environment torchrun sets decides. Ranks use NCCL on CUDA and gloo on CPU; the local rank picks the
GPU, the global rank the role (rank 0 alone prints and writes).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .io import atomic_write

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------
@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def start_processes(device: str) -> Processes:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run alone. `device` is "cpu",
    "cuda" (each rank its LOCAL_RANK's GPU) or "cuda:i" (one process only)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: torch sees no CUDA device")
        if world > 1 and dev.index is not None:
            raise RuntimeError(f"--device {device} names one GPU, but torchrun started {world} processes: "
                               f"give --device cuda (each rank takes its LOCAL_RANK's GPU)")
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return Processes(rank=rank, world=world, local_rank=local, device=dev)


def kill_point(s: dict, point: str, it: int | None = None) -> None:
    """Fault injection (the hidden --kill-at): end this process at once where a kill -9 could land --
    no cleanup, no flush, files as they are -- so tests can check that --resume recovers exactly."""
    want = s.get("kill_at")
    if want:
        name, _, n = want.partition(":")
        if name == point and (not n or it == int(n)):
            os._exit(137)


def stop_processes(p: Processes) -> None:
    if p.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, p: Processes) -> torch.nn.Module:
    """The model as DDP when several ranks train it (gradients are averaged over ranks in backward)."""
    if not p.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [p.device.index] if p.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(
        model, torch.nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------
class Precision:
    """autocast for forward passes (fp32 master weights) and, for fp16, a GradScaler."""

    def __init__(self, amp: str, device: torch.device):
        if amp not in AMP_DTYPES:
            raise ValueError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        self.name, self.dtype, self.device = amp, AMP_DTYPES[amp], device
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def tensor_dtype(self) -> torch.dtype:
        return self.dtype or torch.float32

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> bool:
        """Unscale the gradients in place (fp16) so they are the true ones; whether all are finite (in
        every precision: a non-finite gradient under a finite loss happens in bf16 and fp32 too). A step
        whose gradients are not finite is skipped (:meth:`step`) and must not feed the saliency."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        return grads_finite(q for g in opt.param_groups for q in g["params"])

    def step(self, opt: torch.optim.Optimizer, finite: bool = True) -> None:
        """The optimizer step: fp16's scaler skips it itself after an overflow (and lowers its scale);
        other precisions skip it when `finite` (from :meth:`unscale`) is False."""
        if self.scaler is None:
            if finite:
                opt.step()
        else:
            self.scaler.step(opt)
            self.scaler.update()

    def scaled_gradients(self, loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
        """Backward for gradients alone (no optimizer: one-shot saliency), fp16 with loss scaling: the
        loss is scaled by the scaler's current scale and the gradients unscaled in place. Whether they
        are finite; after an fp16 overflow the scale is halved (so a retry of the batch can succeed)."""
        if self.scaler is None:
            loss.backward()
            return grads_finite(params)
        self.scaler.scale(loss).backward()
        scale = float(self.scaler.get_scale())
        grads = [q.grad for q in params if q.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / scale)
        finite = grads_finite(params)
        if not finite:
            self.scaler.update(new_scale=scale / 2)
        return finite

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def grads_finite(params) -> bool:
    """Whether every gradient of `params` is finite (one reduction per tensor, one sync)."""
    grads = [q.grad for q in params if q.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([g.detach().abs().amax().float() for g in grads]).isfinite().all())


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------
def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norms, tokens and position embeddings take no weight decay (DeiT / timm convention)."""
    return p.ndim <= 1 or name.endswith("_token") or name.endswith("pos_embed")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, skip = [], []
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            (skip if no_weight_decay(name, p) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": skip, "weight_decay": 0.0}], lr=lr)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, p: Processes | None = None, *, batch_size: int = 250,
             precision: Precision | None = None, workers: int = 0, progress: bool = False) -> float:
    """Top-1 (%) over the whole `dataset`, each rank on its contiguous shard, counts summed."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from .loader import shard_range

    p = p or Processes()
    m = unwrap(model)
    was_training = m.training
    m.eval()
    # A streaming (iterable) dataset is sharded over the ranks by its reader (timm's); a map-style one here.
    shard = dataset if isinstance(dataset, torch.utils.data.IterableDataset) else \
        Subset(dataset, shard_range(len(dataset), p.rank, p.world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=p.device.type == "cuda")
    correct = seen = 0
    ctx = precision.autocast() if precision is not None else contextlib.nullcontext()
    with ctx:
        for x, y in tqdm(loader, desc="eval", leave=False, disable=not (progress and p.main)):
            out = m(x.to(p.device, non_blocking=True))
            correct += (out.argmax(-1).cpu() == y).sum().item()
            seen += len(y)
    m.train(was_training)
    total_correct, total = p.sum([correct, seen])
    return 100.0 * total_correct / max(total, 1)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def kl_soft(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)); T² keeps the gradient scale independent of T."""
    return F.kl_div(F.log_softmax(student.float() / T, dim=-1), F.log_softmax(teacher.float() / T, dim=-1),
                    reduction="batchmean", log_target=True) * (T * T)


def distillation_loss(student, teacher, target: torch.Tensor, *, temperature: float, weight: float,
                      label_smoothing: float = 0.0, hard_teacher: torch.Tensor | None = None) -> torch.Tensor:
    """(1 − weight)·CE + weight·T²·KL to the teacher.

    A student (or teacher) given as a pair (class head, distillation head) -- a DeiT distilled model in
    distilled training -- gets the paper's losses (NViT Eq. 8-9): CE on the class head; KL of each head to
    the teacher's matching head (or to its single output); and, when `hard_teacher` logits are given,
    hard-label CE from them on the distillation head instead of its KL (DeiT's hard distillation).
    """
    if not isinstance(student, tuple):
        ce = F.cross_entropy(student.float(), target, label_smoothing=label_smoothing)
        if weight == 0.0:
            return ce
        t = (teacher[0] + teacher[1]) / 2 if isinstance(teacher, tuple) else teacher
        return (1.0 - weight) * ce + weight * kl_soft(student, t, temperature)
    cls_out, dist_out = student
    t_cls, t_dist = teacher if isinstance(teacher, tuple) else (teacher, teacher)
    ce = F.cross_entropy(cls_out.float(), target, label_smoothing=label_smoothing)
    cls_term = (1.0 - weight) * ce + weight * kl_soft(cls_out, t_cls, temperature)
    if hard_teacher is not None:
        dist_term = F.cross_entropy(dist_out.float(), hard_teacher.argmax(-1))
    else:
        dist_term = kl_soft(dist_out, t_dist, temperature)
    return (cls_term + dist_term) / 2


# --------------------------------------------------------------------------------------------------
# Checkpoints and agreement
# --------------------------------------------------------------------------------------------------
class WriteFailed(RuntimeError):
    """A file of the run could not be written (disk full, …); the file it replaces is intact."""


def save_checkpoint(state: dict, path: Path, p: Processes) -> None:
    """Rank 0 writes (atomically: temp file + rename); every rank waits for it, and every rank stops
    with a WriteFailed if the write failed (the previous file stays whole)."""
    error = None
    if p.main:
        try:
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        except OSError as e:
            error = e
    failed = p.sum([float(error is not None)])[0] > 0 if p.distributed else error is not None
    if failed:
        why = f"{error.strerror or error}" if error is not None else "see rank 0"
        raise WriteFailed(f"could not write {path} ({why}); the previous {path.name} is intact: free the space "
                          f"and continue with --resume {path.parent if path.name == 'checkpoint.pt' else path.parent.parent}")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RanksDisagree(RuntimeError):
    pass


def check_agreement(what: str, tensors: dict[str, torch.Tensor], p: Processes) -> None:
    """All ranks must hold identical `tensors` (e.g. the prune masks): compare digests, else raise."""
    if not p.distributed:
        return
    digests = p.gather_objects(tensors_digest(tensors))
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RanksDisagree(f"ranks disagree on the {what}: rank(s) {differ} differ from rank 0 "
                            f"(digests {[d[:12] for d in digests]}); stopping rather than training different models")
