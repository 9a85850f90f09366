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

Validation (--val-shards, trainer.validate): every --val-every steps and at the end, rank 0 scores the EMA
network on a labelled set, logs val_* columns, saves a checkpoint at that step and points `best` at the
checkpoint with the lowest validation RMSE. It draws no random number and leaves the training data alone:
the weights are the same with and without it. At the end, curves.png (trainer.curves) draws the run.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from shared.fsutil import write_json
from shared.scan.spec import ScanSpec
from trainer import checkpoint as ckpt
from trainer import provenance
from trainer import validate as validation
from trainer.data import DataConfig, DataPosition, make_loader, parse_hw
from trainer.losses import DistillLossConfig, distill_loss, pretrain_loss
from trainer.model import (
    build_model,
    is_plugin_name,
    model_config_dict,
    network_inputs,
    output_list,
    resolve_convention,
)

log = logging.getLogger("trainer")

STAGES = ("pretrain", "finetune")


@dataclass
class TrainConfig:
    stage: str = "pretrain"
    shards: str | list = "shards"
    out: str = "runs/pretrain"
    model: str | None = None  # preset name or pkg.module:Class; None: the --init checkpoint's network, else "bpnet-s"
    model_kwargs: dict | None = None  # constructor kwargs of a pkg.module:Class network (JSON values)
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
    # pretrain: a new scan of every frame each epoch, from its dense pseudo depth (the datagen spellings;
    # None: the shards' stored scans). "shard": each sample's own settings (meta.json lidar.spec).
    lidar: str | None = None
    mount: str | None = None  # with --lidar: random (default), kitti or none
    sensor: str | None = None  # with --lidar: ideal, realistic, ... (default: a pattern file's own, else ideal)
    hidden_geometry: bool | None = None  # with --lidar: None = on for an offset mount
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
    # validation (trainer.validate): off without val_shards
    val_shards: str | list | None = None  # a labelled set with GT, made from its own seed (never the test set)
    val_every: int | None = None  # steps between validations (None: ckpt_every); always at the end too
    val_top_rows: int | str | None = None  # R: also score the top R rows; "auto": the rows above every label
    curves: bool = True  # write curves.png (loss and validation against steps) at the end


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
        ema, now = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                ema.append(e)
                now.append(m.detach())
            else:
                e.copy_(m)
        torch._foreach_lerp_(ema, now, 1.0 - d)  # one call for all tensors; the same values as lerp_ on each


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over param_groups. fused: one kernel over all parameters, on a CPU as on a GPU (3x faster than
    the per-tensor loop for bpnet-s; the same update up to float rounding)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError for settings that describe no run (stage, crop, fine-tuning loss, new scans)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    if cfg.stage == "finetune":
        distill_config(cfg)  # raises on a bad --space/--penalty/--fit
    parse_hw(cfg.crop)
    rescan_spec(cfg)  # raises on a bad --lidar/--mount/--sensor
    validation.parse_top_rows(cfg.val_top_rows)
    if cfg.val_every is not None and cfg.val_every <= 0:
        raise ValueError(f"--val-every must be a positive number of steps, got {cfg.val_every}")
    if cfg.model_kwargs and not is_plugin_name(cfg.model):
        raise ValueError("--model-kwargs is for a plugin network (--model pkg.module:Class)")


def setup(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process: checks the settings that must fail before any work (stage,
    crop, fine-tuning loss, batch split), initialises the process group under torchrun, picks the device and
    the CPU threads."""
    validate(cfg)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device.startswith("cuda")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if rank == 0 and (hazard := ckpt.torchrun_restart_hazard()):
            log.warning(hazard)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world} processes")
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    return rank, world, device


def resume_checkpoint(out: Path, warn: bool) -> Path | None:
    """The checkpoint --resume continues from: the latest of the run directory (None: from step 0)."""
    path = ckpt.latest_checkpoint(out)
    if path is None and warn:
        log.warning("--resume: no checkpoint in %s, starting from step 0", out)
    return path


def training_provenance(cfg: TrainConfig, resume_from: Path | None = None) -> list[dict]:
    """The checkpoint metadata `provenance` of this run (trainer.provenance): a resumed run keeps its
    checkpoint's; otherwise --init's entries (ours record theirs; an original .pth is one entry saying its data
    is not recorded) followed by those of --shards."""
    if resume_from is not None:
        recorded = ckpt.read_metadata(resume_from).get("provenance")
        if isinstance(recorded, list):
            return recorded
    parent: list = []
    if cfg.init:
        original = Path(cfg.init).suffix in (".pth", ".pt")
        recorded = None if original else ckpt.read_metadata(cfg.init).get("provenance")
        if isinstance(recorded, list):
            parent = recorded
        else:  # what is not known is said, rather than left out
            parent = [{"init": str(cfg.init), "source": None, "teacher": {
                "id": None, "revision": None, "licence": provenance.UNKNOWN, "non_commercial": False},
                "note": "original BP-Net / DMD3C weights: their training data is not recorded" if original
                else "a checkpoint written before provenance was recorded"}]
    return provenance.run_provenance(parent, cfg.shards, cfg.stage)


def build_initial_model(cfg: TrainConfig, resume_from: Path | None = None):
    """(model, model_name, convention): the trained weights of the checkpoint --resume continues, or those of
    --init (its own network unless --model differs, its recorded input convention), or a fresh preset."""
    if resume_from is not None:
        model, meta = ckpt.load_model(resume_from, which="model")
        if meta.get("stage") not in (None, cfg.stage):
            raise ValueError(f"{resume_from} is a {meta['stage']} checkpoint; this run is {cfg.stage}")
        convention = resolve_convention(cfg.convention, meta.get("convention"), str(resume_from))
        return model, meta.get("model_name", "custom"), convention
    if cfg.init:
        model, info = ckpt.load_model(cfg.init, cfg.model, which="ema")
        convention = resolve_convention(cfg.convention, info.get("convention"), cfg.init)
        return model, info.get("model_name") or cfg.model or "custom", convention
    name = cfg.model or "bpnet-s"
    return build_model(name, cfg.model_kwargs), name, resolve_convention(cfg.convention, None, "a new network")


def rescan_spec(cfg: TrainConfig) -> ScanSpec | str | None:
    """The scan the loader casts anew every epoch (--lidar and its companions), or None: the stored scans."""
    extra = {k: v for k, v in (("--mount", cfg.mount), ("--sensor", cfg.sensor),
                               ("--hidden-geometry", cfg.hidden_geometry)) if v is not None}
    if cfg.lidar is None:
        if extra:
            raise ValueError(f"{', '.join(extra)} describe the new scan of --lidar; without --lidar the shards' "
                             "stored scans are used")
        return None
    if cfg.stage != "pretrain":
        raise ValueError("--lidar casts new scans from the dense pseudo depth of unlabelled shards: it is for "
                         "pretrain; fine-tuning uses the labelled shards' real scans")
    if cfg.lidar == "shard":
        if extra:
            raise ValueError(f"--lidar shard takes each sample's own scan settings; drop {', '.join(extra)}")
        return "shard"
    return ScanSpec.from_cli(lidar=cfg.lidar, mount=cfg.mount or "random", hidden_geometry=cfg.hidden_geometry,
                             sensor=cfg.sensor)


def train_data_config(cfg: TrainConfig, world: int) -> DataConfig:
    """This process's part of the global batch, with the run's crop, augmentation, new scans and seed."""
    return DataConfig(shards=cfg.shards, batch_size=cfg.batch_size // world, crop_hw=parse_hw(cfg.crop),
                      train=True, shuffle_buffer=cfg.shuffle_buffer, flip=cfg.flip, jitter=cfg.jitter,
                      workers=cfg.workers, seed=cfg.seed, rescan=rescan_spec(cfg))


def to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def distill_config(cfg: TrainConfig) -> DistillLossConfig:
    """The fine-tuning loss settings of a run (raises ValueError on a bad --space/--penalty/--fit)."""
    return DistillLossConfig(lambda_ssi=cfg.lambda_ssi, lambda_reg=cfg.lambda_reg, space=cfg.space,
                             penalty=cfg.penalty, fit=cfg.fit, sup_kind=cfg.sup_loss)


def compute_loss(cfg: TrainConfig, preds: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict]:
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
    """CSV (always) and TensorBoard (when installed) logs of rank 0; appends on resume.

    Every process adds each step's loss and its parts to a window; `end_window` averages them over the
    window's steps (the loss, gradient norm and skipped count also over the processes) into one row, which
    rank 0 writes."""

    # pull_* / share_*: each fine-tuning term's gradient on the final output (trainer.losses.gradient_pulls),
    # over all pixels and over the pixels without a label
    PULLS = tuple(f"{kind}_{t}{where}" for t in ("sup", "ssi", "reg") for kind, where in
                  (("pull", ""), ("pull", "_unlabelled"), ("share", "")))
    # new columns go at the end: a log.csv from before them is rewritten with the longer header on resume
    COLUMNS = ("step", "samples", "loss", "sup", "ssi", "reg", "lr", "grad_norm", "samples_per_s", "skipped",
               "elapsed_s", *PULLS, *validation.VAL_COLUMNS)

    def __init__(self, out: Path, enabled: bool, device: torch.device = torch.device("cpu"), world: int = 1,
                 samples_seen: int = 0):
        self.enabled, self.device, self.world = enabled, device, world
        self.t_start = self.t_row = time.perf_counter()
        self.samples_row = samples_seen
        self._new_window()
        self.first_loss, self.last_row = None, {}
        self.tb = None
        if not enabled:
            return
        path = out / "log.csv"
        self.columns = upgrade_csv_header(path, self.COLUMNS)
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")  # noqa: SIM115 (closed in close)
        self.csv = csv.DictWriter(self.file, fieldnames=self.columns)
        if new:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:
            log.info("tensorboard is not installed: CSV log only")

    def _new_window(self) -> None:
        self.window, self.window_n, self.window_parts = torch.zeros((), device=self.device), 0, {}

    def add(self, loss: torch.Tensor, parts: dict) -> None:
        """One step's loss (a tensor: adding it does not wait for the GPU) and its parts."""
        self.window += loss.detach()
        self.window_n += 1
        for k, v in parts.items():
            if k != "loss":  # distill_loss's components are floats already (it syncs once per step)
                self.window_parts[k] = self.window_parts.get(k, 0.0) + float(v)

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (a validation) out of the current row's samples/s."""
        self.t_row += seconds

    def end_window(self, step: int, samples_seen: int, lr: float, grad_norm: torch.Tensor, skipped: int,
                   extra: dict | None = None) -> dict:
        """The row of the steps since the last one, with `extra` columns (validation); rank 0 writes it. A loss
        that is not finite stops the run."""
        stats = torch.stack([self.window / self.window_n, grad_norm.detach().float(),
                             torch.tensor(float(skipped), device=self.device)])
        if self.world > 1:
            dist.all_reduce(stats)
            stats[:2] /= self.world
        mean_loss, grad_norm, skipped = stats.tolist()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {step}; lower --lr or check the data")
        now = time.perf_counter()
        row = {"step": step, "samples": samples_seen, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
               "samples_per_s": (samples_seen - self.samples_row) / max(now - self.t_row, 1e-9),
               "skipped": int(skipped), "elapsed_s": now - self.t_start,
               **{k: v / self.window_n for k, v in self.window_parts.items()}, **(extra or {})}
        self.write(row)
        self.first_loss = mean_loss if self.first_loss is None else self.first_loss
        self.last_row, self.t_row, self.samples_row = row, now, samples_seen
        self._new_window()
        return row

    def summary(self, samples_this_run: int) -> dict:
        """First and last logged loss, the last row, and the speed over the whole run."""
        wall, last = time.perf_counter() - self.t_start, self.last_row
        return {"first_loss": self.first_loss, "final_loss": last.get("loss"), "final": last,
                "skipped_samples": last.get("skipped", 0), "samples_per_s": samples_this_run / max(wall, 1e-9),
                "wall_s": wall}

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.csv.writerow({k: row.get(k, "") for k in self.columns})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "samples") and isinstance(v, (int, float)):
                    group = ("pull/" if k.startswith(("pull_", "share_")) else "val/" if k.startswith("val_")
                             else "loss/")
                    tag = k if k in ("lr", "grad_norm", "samples_per_s", "skipped", "elapsed_s") else group + k
                    self.tb.add_scalar(tag, v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def upgrade_csv_header(path: Path, columns: tuple[str, ...]) -> list[str]:
    """The columns to write to an existing log.csv: its own header followed by the columns it lacks. When it
    lacks some (a run started before they existed), the file is rewritten, atomically, with that longer
    header and its old rows (empty in the new columns), so that a resumed run's CSV stays one table."""
    if not path.exists() or path.stat().st_size == 0:
        return list(columns)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        missing = [c for c in columns if c not in header]
        if not missing:
            return header
        rows = list(reader)
    merged = header + missing
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=merged)
        writer.writeheader()
        writer.writerows({k: r.get(k) or "" for k in merged} for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return merged


class KeyLog:
    """--log-keys: every sample key this process consumes, a line (step, epoch, key) each (data audits)."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a") if path else None  # noqa: SIM115 (closed in close)

    def write(self, step: int, batch: dict) -> None:
        if self.file is not None:
            self.file.writelines(f"{step}\t{int(e)}\t{k}\n" for e, k in zip(batch["epoch"], batch["key"], strict=True))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def check_first_batch(batch: dict, stage: str, rank: int) -> None:
    """A run that can only produce zero losses should say so at once."""
    need = "has_depth" if stage == "pretrain" else "has_gt"
    if not batch[need].any():
        log.warning("rank %d: no sample of the first batch has %s.png: the %s loss is 0 on such samples; "
                    "check --shards", rank, need[4:], stage)


def train(cfg: TrainConfig) -> dict:
    """Run one stage; returns the summary (also written to cfg.json by rank 0)."""
    rank, world, device = setup(cfg)
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    out, master = Path(cfg.out), rank == 0
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if removed := ckpt.remove_partial(out):  # left by a process killed inside a checkpoint write
            log.info("removed %d partial file(s) of a killed run: %s", len(removed), ", ".join(removed))

    # model, EMA, optimizer: fresh, from --init, or from the latest checkpoint of --out (--resume)
    torch.manual_seed(cfg.seed)
    resume_from = resume_checkpoint(out, warn=master) if cfg.resume else None
    raw_model, model_name, convention = build_initial_model(cfg, resume_from)
    raw_model.to(device)
    ema = EMA(raw_model, cfg.ema_decay, cfg.ema_warmup)
    opt = make_optimizer(raw_model, cfg)
    state = ckpt.restore_training(resume_from, ema, opt, rank, world) if resume_from else ckpt.TrainingState()
    model = raw_model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        raw_model, device_ids=[device.index] if device.type == "cuda" else None)

    # data: this process's part of the shards, from where the checkpoint left it
    batches = iter(make_loader(train_data_config(cfg, world), rank, world, state.data_start,
                               pin_memory=device.type == "cuda"))
    position = DataPosition(cfg.workers, state.data_start)

    # validation: rank 0 scores the EMA network every val_every steps (trainer.validate)
    val_every = cfg.val_every or cfg.ckpt_every
    top_rows = validation.parse_top_rows(cfg.val_top_rows)
    if cfg.val_shards and master:
        validation.check_val_shards(cfg.val_shards)
        if top_rows == "auto":
            top_rows = validation.unlabelled_rows(cfg.shards)
            log.info("validation: the top %d rows hold no label in %s", top_rows, cfg.shards)
    best_rmse = float("inf")
    if master and resume_from is not None:
        best_rmse = ckpt.best_val_rmse(out)  # the score a resumed run must beat
    elif master:
        (out / "best").unlink(missing_ok=True)  # a fresh run: a marker left by an earlier run means nothing now
    last_val: dict | None = None

    # RNG last: nothing above may shift it between a straight run and a resumed one
    torch.manual_seed(cfg.seed + 1000 * rank + state.step)
    if state.rng is not None:
        ckpt.set_rng_state(state.rng, device)

    # the loop
    meta = {"model_name": model_name, "model_config": model_config_dict(raw_model), "stage": cfg.stage,
            "convention": convention, "train_config": asdict(cfg),
            "provenance": training_provenance(cfg, resume_from) if master else []}
    n_params = sum(p.numel() for p in raw_model.parameters())
    if master:
        log.info("%s: %s (%.2fM parameters) on %s x %d, %d steps from step %d, batch %d, crop %s", cfg.stage,
                 model_name, n_params / 1e6, device, world, cfg.steps, state.step, cfg.batch_size, cfg.crop)
    runlog = RunLog(out, master, device, world, state.samples_seen)
    keys = KeyLog(out / f"keys-rank{rank}.tsv" if cfg.log_keys else None)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (master and cfg.progress), dynamic_ncols=True,
               unit="step", desc=cfg.stage)
    step, samples_seen, last_path = state.step, state.samples_seen, None
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    model.train()
    while step < end:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(batches)
        position.update(batch)
        if step == state.step:
            check_first_batch(batch, cfg.stage, rank)
        keys.write(step, batch)
        batch = to_device(batch, device)

        rgb, sparse, scale = network_inputs(batch["rgb_raw"], batch["sparse"], convention)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            preds = model(rgb, sparse, batch["K"])
        preds = [p.float() / scale for p in output_list(preds)]  # metres, whatever the network's convention
        loss, parts = compute_loss(cfg, preds, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(raw_model)
        step += 1
        samples_seen += cfg.batch_size
        runlog.add(loss, parts)
        bar.update(1)

        val_due = bool(cfg.val_shards) and (step % val_every == 0 or step == end)
        val = None
        if val_due and master:
            val = validation.validate(ema.module, cfg.val_shards, convention, top_rows or None)
            runlog.pause(val["val_s"])
            last_val = {"step": step, **val}
        if step % cfg.log_every == 0 or step == end or val_due:
            row = runlog.end_window(step, samples_seen, lr, grad_norm, position.skipped, extra=val)
            bar.set_postfix(loss=f"{row['loss']:.4g}", sps=f"{row['samples_per_s']:.1f}", skipped=row["skipped"],
                            **({"val_rmse": f"{val['val_rmse_m']:.3f}"} if val else {}))
        if step % cfg.ckpt_every == 0 or step == end or val_due:  # a validation always has its checkpoint
            is_best = val is not None and val["val_rmse_m"] < best_rmse
            last_path = ckpt.save_training(
                out, step, samples_seen, raw_model, ema, opt, position.state(), meta, cfg.keep,
                val=validation.as_checkpoint_meta(val, cfg.val_shards, top_rows) if val else None,
                best=is_best) or last_path
            best_rmse = val["val_rmse_m"] if is_best else best_rmse

    bar.close()
    runlog.close()
    keys.close()
    del batches
    best_path = ckpt.best_checkpoint(out) if master else None
    summary = {"stage": cfg.stage, "model": model_name, "parameters": n_params, "steps": step,
               "steps_this_run": step - state.step, "samples_seen": samples_seen, "world_size": world,
               "device": str(device), "amp_bf16": amp, **runlog.summary(samples_seen - state.samples_seen),
               "checkpoint": str(last_path) if last_path else None, "out": str(out),
               "val": last_val, "best_checkpoint": str(best_path) if best_path else None,
               "best_val_rmse_m": best_rmse if best_path else None}
    if master and cfg.curves:
        from trainer.curves import plot_run

        summary["curves"] = str(plot_run(out))
    if master and cfg.json:
        write_json(cfg.json, summary)
    if world > 1:
        dist.destroy_process_group()
    return summary
