"""The training loop of both stages, top to bottom (nanoGPT style).

    pretrain: L_pre, multi-scale L1 to the dense pseudo depth of the shards, on simulated LiDAR input
    finetune: L_sup + lambda_ssi L_SSI + lambda_reg L_reg (trainer.losses.distill_loss)

Same loop for both: AdamW (weight decay on weights only, none on 1-D parameters: biases, norms),
one-cycle cosine learning rate, gradient clipping, an EMA of the weights (what eval and predict use),
bf16 autocast on a GPU and fp32 on a CPU, step-based. Under torchrun every process trains on its own
part of the shards (DDP: nccl on GPU, gloo on CPU); --batch-size is the global batch, split over the
processes; only rank 0 writes checkpoints and logs.

Resume is exact: the checkpoint holds the weights, EMA, optimizer, RNG states and the data position,
so N steps straight and N/2 + resume + N/2 give the same weights (on a CPU, same seed).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import checkpoint as ckpt
from trainer.data import DataConfig, DataPosition, make_loader, parse_hw

log = logging.getLogger("trainer")

STAGES = ("pretrain", "finetune")


@dataclass
class TrainConfig:
    stage: str = "pretrain"
    shards: str | list = "shards"
    out: str = "runs/pretrain"
    model: str | None = None  # preset name; None: the --init checkpoint's network, else "bpnet-s"
    init: str | None = None  # our checkpoint / export, or an original BP-Net / DMD3C .pth
    # input convention (trainer.model.INPUT_CONVENTIONS): None = what --init records, else kitti; "nyu" to
    # fine-tune an original BP-Net NYU .pth (ImageNet RGB, depth x 10). Recorded in our checkpoints.
    convention: str | None = None
    resume: bool = False
    stop_at: int | None = None  # leave (with a checkpoint) after this step; the schedule still spans `steps`
    # schedule
    steps: int = 1000
    batch_size: int = 4  # global: split over DDP processes
    crop: str = "128x256"
    lr: float = 1e-3  # peak of the one-cycle schedule
    lr_start_frac: float = 1 / 40  # BP-Net: OneCycleLR div_factor 40 ...
    lr_end_frac: float = 1 / 4  # ... and final_div_factor 0.1, i.e. it ends at peak / 4
    warmup_frac: float = 0.1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.1
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)): short runs get a useful EMA
    # data
    workers: int = 2
    shuffle_buffer: int = 256
    flip: bool = True
    jitter: float = 0.2
    seed: int = 0
    # fine-tuning loss (trainer.losses.DistillLossConfig)
    lambda_ssi: float = 1.0
    lambda_reg: float = 0.5
    space: str = "disparity"  # where the teacher is fitted: disparity, or depth (needs depth.png in the shards)
    penalty: str = "depth"  # units of L_SSI / L_reg: depth (metres, as L_sup) or disparity (1/m, ~100x weaker)
    fit: str = "lsq"  # lsq (closed form) or l1 (the L1-optimal scale and shift)
    sup_loss: str = "l1"
    log_pulls: bool = True  # log each term's gradient pull on the prediction (pull_*, share_* in log.csv)
    # bookkeeping
    log_every: int = 10
    ckpt_every: int = 500
    keep: int = 3
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | none
    threads: int | None = None  # torch CPU threads (None: torch's default)
    json: str | None = None
    progress: bool = True
    log_keys: bool = False  # write every consumed sample key per rank to keys-rank<r>.tsv (data audits)
    extra: dict = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """One-cycle cosine: cosine ramp from lr * start_frac to lr over the warm-up, cosine decay to lr * end_frac."""
    peak, start, end = cfg.lr, cfg.lr * cfg.lr_start_frac, cfg.lr * cfg.lr_end_frac
    warm = max(1, round(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return start + (peak - start) * (1 - math.cos(math.pi * step / warm)) / 2
    t = min(1.0, (step - warm) / max(1, cfg.steps - warm))
    return end + (peak - end) * (1 + math.cos(math.pi * t)) / 2


class EMA:
    """Exponential moving average of the weights (and BN statistics) in a frozen copy of the model."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1.0 - d)
            else:
                e.copy_(m)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def build_initial_model(cfg: TrainConfig):
    """(model, model_name, convention): from --init (its own network unless --model differs, its recorded
    input convention) or a fresh preset."""
    from trainer.model import build_model, resolve_convention

    if cfg.init:
        model, info = ckpt.load_model(cfg.init, cfg.model, which="ema")
        convention = resolve_convention(cfg.convention, info.get("convention"), cfg.init)
        return model, info.get("model_name") or cfg.model or "custom", convention
    name = cfg.model or "bpnet-s"
    return build_model(name), name, resolve_convention(cfg.convention, None, "a new network")


def to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def distill_config(cfg: TrainConfig):
    """The fine-tuning loss settings of a run (raises ValueError on a bad --space/--penalty/--fit)."""
    from trainer.losses import DistillLossConfig

    return DistillLossConfig(lambda_ssi=cfg.lambda_ssi, lambda_reg=cfg.lambda_reg, space=cfg.space,
                             penalty=cfg.penalty, fit=cfg.fit, sup_kind=cfg.sup_loss)


def compute_loss(cfg: TrainConfig, preds: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict]:
    from trainer.losses import distill_loss, pretrain_loss

    if cfg.stage == "pretrain":
        loss = pretrain_loss(preds, batch["depth"], batch["depth"] > 0)
        return loss, {"loss": loss}
    loss_cfg = distill_config(cfg)
    spaces = set(batch.get("teacher_space") or ["disparity"])
    if len(spaces) > 1:
        raise ValueError("this batch mixes teachers affine in disparity and in depth (meta teacher.output); "
                         "fine-tune on shards of one teacher kind at a time")
    if cfg.space == "disparity" and spaces == {"depth"}:  # a relative-depth teacher is fitted in depth
        batch = {**batch, "teacher_depth": batch["teacher"]}
        loss_cfg = dataclasses.replace(loss_cfg, space="depth")
    elif cfg.space == "depth":  # a depth-like teacher: the shards' dense pseudo depth
        missing = [k for k, has in zip(batch["key"], batch["has_depth"].tolist(), strict=True) if not has]
        if missing:
            raise ValueError(
                f"--space depth fits the teacher in depth and needs each sample's dense pseudo depth "
                f"(depth.png), but {len(missing)} of this batch have none (e.g. {missing[0]}). Labelled "
                "shards (kitti, nyu, synthetic --labelled) hold the teacher's disparity (teacher.png) only: "
                "use --space disparity (the default), which fits in disparity and penalises in metres.")
        batch = {**batch, "teacher_depth": batch["depth"]}
    total, parts = distill_loss(preds, batch, loss_cfg, pulls=cfg.log_pulls)
    return total, {"loss": total, **{k: v for k, v in parts.items() if k != "total"}}


class RunLog:
    """CSV (always) and TensorBoard (when installed) logs of rank 0; appends on resume."""

    # pull_* / share_*: each fine-tuning term's gradient on the final output (trainer.losses.gradient_pulls),
    # over all pixels and over the pixels without a label
    PULLS = tuple(f"{kind}_{t}{where}" for t in ("sup", "ssi", "reg") for kind, where in
                  (("pull", ""), ("pull", "_unlabelled"), ("share", "")))
    COLUMNS = ("step", "samples", "loss", "sup", "ssi", "reg", "lr", "grad_norm", "samples_per_s", "skipped",
               "elapsed_s", *PULLS)

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        path = out / "log.csv"
        new = not path.exists()
        self.file = open(path, "a", newline="")  # noqa: SIM115 (closed in close)
        self.csv = csv.DictWriter(self.file, fieldnames=self.COLUMNS)
        if new:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:
            log.info("tensorboard is not installed: CSV log only")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.csv.writerow({k: row.get(k, "") for k in self.COLUMNS})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "samples") and isinstance(v, (int, float)):
                    group = "pull/" if k.startswith(("pull_", "share_")) else "loss/"
                    tag = k if k in ("lr", "grad_norm", "samples_per_s", "skipped", "elapsed_s") else group + k
                    self.tb.add_scalar(tag, v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def train(cfg: TrainConfig) -> dict:
    """Run one stage; returns the summary (also written to cfg.json by rank 0)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    if cfg.stage == "finetune":
        distill_config(cfg)  # refuse bad loss settings before any work
    crop_hw = parse_hw(cfg.crop)
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world} processes")
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    out = Path(cfg.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------------------
    # model, EMA, optimizer: fresh, from --init, or from the latest checkpoint of --out (--resume)
    torch.manual_seed(cfg.seed)
    resume_from = ckpt.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None and master:
        log.warning("--resume: no checkpoint in %s, starting from step 0", out)
    if resume_from is not None:
        from trainer.model import build_model, resolve_convention

        model_sd, meta = ckpt.read_checkpoint(resume_from, "model")
        if meta.get("stage") not in (None, cfg.stage):
            raise ValueError(f"{resume_from} is a {meta['stage']} checkpoint; this run is {cfg.stage}")
        model, model_name = build_model(meta["model_config"]), meta.get("model_name", "custom")
        model.load_state_dict(model_sd)
        convention = resolve_convention(cfg.convention, meta.get("convention"), str(resume_from))
    else:
        model, model_name, convention = build_initial_model(cfg)
    from trainer.model import model_config_dict, network_inputs

    model.to(device)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                            fused=device.type == "cuda")
    step, samples_seen, data_start = 0, 0, None
    if resume_from is not None:
        ema_sd, _ = ckpt.read_checkpoint(resume_from, "ema")
        ema.module.load_state_dict(ema_sd)
        state = ckpt.read_state(resume_from)
        opt.load_state_dict(state["optimizer"])
        step, samples_seen, ema.updates = int(state["step"]), int(state["samples_seen"]), int(state["ema_updates"])
        ranks = state["data"]["ranks"]
        data_start = ranks[rank] if state["data"]["world_size"] == world else None
        if data_start is None and master:
            log.warning("checkpoint written by %d processes, now %d: the data restarts at epoch 0",
                        state["data"]["world_size"], world)
    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)

    # -------------------------------------------------------------------------
    # data
    data_cfg = DataConfig(shards=cfg.shards, batch_size=cfg.batch_size // world, crop_hw=crop_hw, train=True,
                          shuffle_buffer=cfg.shuffle_buffer, flip=cfg.flip, jitter=cfg.jitter,
                          workers=cfg.workers, seed=cfg.seed)
    loader = make_loader(data_cfg, rank, world, data_start, pin_memory=device.type == "cuda")
    position = DataPosition(cfg.workers, data_start)
    batches = iter(loader)

    # RNG last: nothing above may shift it between a straight run and a resumed one
    torch.manual_seed(cfg.seed + 1000 * rank + step)
    if resume_from is not None:
        rng = state["rng"][rank] if len(state["rng"]) == world else state["rng"][0]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)

    meta = {"model_name": model_name, "model_config": model_config_dict(raw_model), "stage": cfg.stage,
            "convention": convention, "train_config": asdict(cfg)}

    def save(at_step: int) -> Path | None:
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        data_states, rngs = [position.state()], [rng]
        if world > 1:  # every rank's data position and RNG, so that all of them resume exactly
            data_states, rngs = [None] * world, [None] * world
            dist.all_gather_object(data_states, position.state())
            dist.all_gather_object(rngs, {k: v.cpu() for k, v in rng.items()})
        path = None
        if master:
            state = {"step": at_step, "samples_seen": samples_seen, "ema_updates": ema.updates,
                     "optimizer": opt.state_dict(), "rng": rngs,
                     "data": {"world_size": world, "ranks": data_states}}
            path = ckpt.save_checkpoint(out, at_step, raw_model.state_dict(), ema.module.state_dict(),
                                        {**meta, "samples_seen": samples_seen}, state, keep=cfg.keep)
        if world > 1:
            dist.barrier()
        return path

    # -------------------------------------------------------------------------
    # the loop
    from tqdm import tqdm

    runlog = RunLog(out, master)
    keys_file = open(out / f"keys-rank{rank}.tsv", "a") if cfg.log_keys else None  # noqa: SIM115
    bar = tqdm(total=cfg.steps, initial=step, disable=not (master and cfg.progress), dynamic_ncols=True,
               unit="step", desc=cfg.stage)
    n_params = sum(p.numel() for p in raw_model.parameters())
    if master:
        log.info("%s: %s (%.2fM parameters) on %s x %d, %d steps from step %d, batch %d, crop %s", cfg.stage,
                 model_name, n_params / 1e6, device, world, cfg.steps, step, cfg.batch_size, cfg.crop)
    model.train()
    start_step, t_start = step, time.perf_counter()
    t_log, samples_log = t_start, samples_seen
    window = torch.zeros((), device=device)
    window_n, window_parts, first_loss, last_row, last_path = 0, {}, None, {}, None
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    while step < end:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(batches)
        position.update(batch)
        if step == start_step:  # a run that can only produce zero losses should say so at once
            need = "has_depth" if cfg.stage == "pretrain" else "has_gt"
            if not batch[need].any():
                log.warning("rank %d: no sample of the first batch has %s.png: the %s loss is 0 on such "
                            "samples; check --shards", rank, need[4:], cfg.stage)
        if keys_file is not None:
            keys_file.writelines(f"{step}\t{int(e)}\t{k}\n" for e, k in zip(batch["epoch"], batch["key"], strict=True))
        batch = to_device(batch, device)

        rgb, sparse, scale = network_inputs(batch["rgb_raw"], batch["sparse"], convention)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            preds = model(rgb, sparse, batch["K"])
        preds = [p.float() / scale for p in preds]  # metres, whatever the network's convention
        loss, parts = compute_loss(cfg, preds, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(raw_model)
        step += 1
        samples_seen += cfg.batch_size
        window += loss.detach()
        window_n += 1
        for k, v in parts.items():
            if k != "loss":  # distill_loss's components are floats already (it syncs once per step)
                window_parts[k] = window_parts.get(k, 0.0) + float(v)
        bar.update(1)

        if step % cfg.log_every == 0 or step == end:
            stats = torch.stack([window / window_n, grad_norm.detach().float(),
                                 torch.tensor(float(position.skipped), device=device)])
            if world > 1:
                dist.all_reduce(stats)
                stats[:2] /= world
            mean_loss, gn, skipped = stats.tolist()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss is {mean_loss} at step {step}; lower --lr or check the data")
            now = time.perf_counter()
            sps = (samples_seen - samples_log) / max(now - t_log, 1e-9)
            first_loss = mean_loss if first_loss is None else first_loss
            last_row = {"step": step, "samples": samples_seen, "loss": mean_loss, "lr": lr, "grad_norm": gn,
                        "samples_per_s": sps, "skipped": int(skipped), "elapsed_s": now - t_start,
                        **{k: v / window_n for k, v in window_parts.items()}}
            runlog.write(last_row)
            bar.set_postfix(loss=f"{mean_loss:.4g}", sps=f"{sps:.1f}", skipped=int(skipped))
            t_log, samples_log, window, window_n, window_parts = now, samples_seen, torch.zeros((), device=device), 0, {}
        if step % cfg.ckpt_every == 0 or step == end:
            last_path = save(step) or last_path

    bar.close()
    runlog.close()
    if keys_file is not None:
        keys_file.close()
    del batches
    wall = time.perf_counter() - t_start
    summary = {"stage": cfg.stage, "model": model_name, "parameters": n_params, "steps": step,
               "steps_this_run": step - start_step, "samples_seen": samples_seen, "world_size": world,
               "device": str(device), "amp_bf16": amp, "first_loss": first_loss,
               "final_loss": last_row.get("loss"), "final": last_row, "skipped_samples": last_row.get("skipped", 0),
               "samples_per_s": (step - start_step) * cfg.batch_size / max(wall, 1e-9), "wall_s": wall,
               "checkpoint": str(last_path) if last_path else None, "out": str(out)}
    if master and cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(summary, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return summary
