"""Checkpoints: weights as safetensors that rebuild their own network, training state beside them.

Layout under a run directory:

    ckpt-0001000.safetensors   tensors "model.<name>" (trained weights) and "ema.<name>" (EMA weights);
                               metadata: format, model_name, model_config (JSON), train_config (JSON),
                               step, stage -- enough to rebuild the network from this file alone
    state-0001000.pt           optimizer, step, RNG states, data position, EMA counter (torch.save of
                               tensors / dicts / lists / numbers only: it loads with weights_only=True)
    latest                     the name of the newest complete checkpoint ("ckpt-0001000")
    best                       with validation (--val-shards): the name of the checkpoint with the lowest
                               validation RMSE; pruning never deletes it

Every file is written atomically (shared.fsutil.atomic_write_bytes), state first, weights second,
`latest` (then `best`) last, old checkpoints pruned after that: a crash at any point leaves `latest` and
`best` naming complete pairs, and at most a temporary file (`*.tmp-<pid>`), which the next run in the
directory deletes (`remove_partial`). `save_training` and
`restore_training` are what the training loop calls: together they make resume exact (N steps straight
== N/2 steps, stop, resume, N/2 steps).
An export (`trainer export`) is one safetensors file with the EMA weights under their plain names.
Original BP-Net / DMD3C .pth files (weights under "net") load through trainer.model.load_original_checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save

from shared.fsutil import TMP_MARK, atomic_write_bytes
from trainer.model import build_model, load_original_checkpoint

log = logging.getLogger("trainer")

FORMAT = "dmd3c-trainer-v1"
EXPORT_FORMAT = "dmd3c-export-v1"
CKPT_RE = re.compile(r"^ckpt-(\d+)\.safetensors$")


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:07d}"


def save_checkpoint(out_dir: str | os.PathLike, step: int, model_sd: dict, ema_sd: dict, meta: dict,
                    state: dict, keep: int = 3, best: bool = False) -> Path:
    """Write ckpt-<step>.safetensors + state-<step>.pt atomically, point `latest` (and, when `best`, the
    `best` marker) at them, prune old ones: all but the newest `keep`, never the one `best` names.

    meta values are JSON-encoded into the safetensors metadata (which holds strings only).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = ckpt_name(step)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out / f"state-{step:07d}.pt", buf.getvalue())
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_sd.items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema_sd.items()})
    metadata = {"format": FORMAT, "step": str(step), **{k: json.dumps(v) for k, v in meta.items()}}
    atomic_write_bytes(out / f"{name}.safetensors", save(tensors, metadata=metadata))
    atomic_write_bytes(out / "latest", (name + "\n").encode())
    if best:
        atomic_write_bytes(out / "best", (name + "\n").encode())
    protected = best_checkpoint(out)
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        if old == protected:
            continue
        old.unlink(missing_ok=True)
        (out / f"state-{_step_of(old):07d}.pt").unlink(missing_ok=True)
    return out / f"{name}.safetensors"


def remove_partial(out_dir: str | os.PathLike) -> list[str]:
    """Delete the temporary files (`*.tmp-<pid>`) a killed writer left in a run directory; their names.
    Called by rank 0 when a run starts, before any checkpoint of this run is written."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    partial = sorted(p for p in out.iterdir() if TMP_MARK in p.name and p.is_file())
    for p in partial:
        p.unlink(missing_ok=True)
    return [p.name for p in partial]


def _step_of(path: Path) -> int:
    return int(CKPT_RE.match(path.name).group(1))


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first (temporary files never match)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if CKPT_RE.match(p.name)), key=_step_of)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names (falling back to the newest complete file), or None."""
    out = Path(out_dir)
    marker = out / "latest"
    if marker.is_file():
        path = out / (marker.read_text().strip() + ".safetensors")
        if path.is_file():
            return path
    found = list_checkpoints(out)
    return found[-1] if found else None


def best_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint the `best` marker names (lowest validation RMSE), or None: no marker (a run without
    --val-shards) or a marker whose checkpoint is gone."""
    marker = Path(out_dir) / "best"
    if not marker.is_file():
        return None
    path = marker.parent / (marker.read_text().strip() + ".safetensors")
    return path if path.is_file() else None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file; a run directory or RUN/latest (its latest checkpoint); RUN/best (the checkpoint with
    the lowest validation RMSE)."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise FileNotFoundError(f"no checkpoint (ckpt-*.safetensors) in directory {p}")
        return found
    if p.name == "latest" and p.is_file():
        return latest_checkpoint(p.parent) or p
    if p.name == "best" and p.parent.is_dir() and not p.suffix:
        found = best_checkpoint(p.parent)
        if found is None:
            why = ("names a checkpoint that is not there" if p.is_file() else
                   "does not exist: the run had no validation (trainer pretrain|finetune --val-shards)")
            raise FileNotFoundError(f"{p} {why}")
        return found
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p


def read_checkpoint(path: str | os.PathLike, which: str = "ema") -> tuple[dict, dict]:
    """(state_dict, metadata) of one of our safetensors files: `which` is "ema" or "model" for a training
    checkpoint; an export has only one set. Metadata values are decoded from JSON where they were."""
    path = resolve(path)
    with safe_open(str(path), framework="pt") as f:
        meta = _decode_metadata(f.metadata())
        keys = list(f.keys())
        fmt = meta.get("format")
        if fmt == FORMAT:
            prefix = f"{which}."
            if not any(k.startswith(prefix) for k in keys):
                raise KeyError(f"{path}: no {which!r} weights in this checkpoint")
            sd = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
        elif fmt == EXPORT_FORMAT:
            sd = {k: f.get_tensor(k) for k in keys}
        else:
            raise ValueError(f"{path}: not a dmd3c checkpoint (metadata format {fmt!r}); original BP-Net / "
                             "DMD3C weights are .pth files")
    meta["path"] = str(path)
    return sd, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint (file or run directory) without its tensors: step, stage, train_config, ..."""
    path = resolve(path)
    with safe_open(str(path), framework="pt") as f:
        return {**_decode_metadata(f.metadata()), "path": str(path)}


def _decode_metadata(raw: dict | None) -> dict:
    # safetensors metadata holds strings: ours are JSON-encoded (save_checkpoint), the format name is not
    meta = {}
    for k, v in (raw or {}).items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v
    return meta


def state_path_for(ckpt: str | os.PathLike) -> Path:
    p = Path(ckpt)
    return p.with_name(f"state-{_step_of(p):07d}.pt")


def read_state(ckpt: str | os.PathLike, map_location="cpu") -> dict:
    """The training state beside a checkpoint; weights_only=True: tensors, dicts, lists, numbers."""
    return torch.load(state_path_for(ckpt), map_location=map_location, weights_only=True)


def export_weights(ckpt: str | os.PathLike, out: str | os.PathLike, which: str = "ema") -> Path:
    """One plain safetensors file with the chosen weights and the network config, for inference."""
    sd, meta = read_checkpoint(ckpt, which)
    metadata = {"format": EXPORT_FORMAT, "weights": json.dumps(which)}
    for k in ("model_name", "model_config", "step", "stage", "convention", "provenance", "val"):
        if k in meta:
            metadata[k] = json.dumps(meta[k])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, save({k: v.contiguous() for k, v in sd.items()}, metadata=metadata))


def load_model(path: str | os.PathLike, model_name: str | None = None, which: str = "ema"):
    """(model, info) from any checkpoint the project knows:
    - ours (a ckpt-*.safetensors, a run directory, or an export): the network is rebuilt from the
      config stored in the file; `model_name`, when given, must agree with it;
    - an original BP-Net / DMD3C .pth (weights under "net"): built from `model_name` (default "bpnet")
      and loaded strictly with torch.load(weights_only=True).
    """
    p = Path(path)
    if p.suffix in (".pth", ".pt") and p.is_file():
        name = model_name or "bpnet"
        model = load_original_checkpoint(build_model(name), p)
        return model, {"path": str(p), "model_name": name, "format": "original-pth", "step": None}
    sd, meta = read_checkpoint(p, which)
    if "model_config" not in meta:
        raise ValueError(f"{p}: no model_config in the checkpoint metadata")
    if model_name and meta.get("model_name") and model_name != meta["model_name"]:
        raise ValueError(f"{p} holds a {meta['model_name']!r} network, not {model_name!r}; leave out --model")
    model = build_model(meta["model_config"])
    model.load_state_dict(sd, strict=True)
    return model, meta


# ---------------------------------------------------------------------------------------------------------
# Training state: what --resume needs to continue exactly where a run stopped


@dataclass
class TrainingState:
    """Where a run stands: counters, and this process's data position and RNG state (None: from the start)."""

    step: int = 0
    samples_seen: int = 0
    data_start: dict | None = None  # trainer.data.DataPosition.state() of this rank
    rng: dict | None = None  # {"torch": ..., "cuda": ...} of this rank


def restore_training(path: str | os.PathLike, ema, opt: torch.optim.Optimizer, rank: int, world: int) -> TrainingState:
    """Load the EMA weights, the optimizer and the counters saved with a checkpoint into `ema` and `opt`;
    return the state this rank continues from. Written by another number of processes, the data
    restarts at epoch 0 (each process's RNG is still restored, the first one's where there is no other)."""
    ema_sd, _ = read_checkpoint(path, "ema")
    ema.module.load_state_dict(ema_sd)
    state = read_state(path)
    opt.load_state_dict(state["optimizer"])
    ema.updates = int(state["ema_updates"])
    data = state["data"]
    data_start = data["ranks"][rank] if data["world_size"] == world else None
    if data_start is None and rank == 0:
        log.warning("checkpoint written by %d processes, now %d: the data restarts at epoch 0",
                    data["world_size"], world)
    rng = state["rng"][rank] if len(state["rng"]) == world else state["rng"][0]
    return TrainingState(int(state["step"]), int(state["samples_seen"]), data_start, rng)


def torchrun_restart_hazard(environ: dict | None = None) -> str | None:
    """Why a restart by torchrun may fail, or None. Restarts are how a DDP run survives a dead rank (--resume
    continues from `latest`), but torchrun shares its TCPStore with the workers by default and keeps it from
    one restart to the next, with the keys the workers wrote: a restarted rank can read its peer's address
    from before the restart and fail to connect, or hang (seen with gloo on CPU)."""
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0:
        return ("torchrun --max-restarts with its shared TCPStore: a restarted rank can read its peer's address "
                "from before the restart and fail to connect or hang; run torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/reliability.md)")
    return None


def set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def best_val_rmse(out_dir: str | os.PathLike) -> float:
    """The validation RMSE recorded in the checkpoint `best` names (what a resumed run must beat), else inf."""
    path = best_checkpoint(out_dir)
    if path is None:
        return float("inf")
    val = read_metadata(path).get("val") or {}
    rmse = val.get("rmse_m")
    return float(rmse) if rmse is not None and rmse == rmse else float("inf")


def save_training(out_dir: str | os.PathLike, step: int, samples_seen: int, model: torch.nn.Module, ema,
                  opt: torch.optim.Optimizer, data_state: dict, meta: dict, keep: int = 3,
                  val: dict | None = None, best: bool = False) -> Path | None:
    """Checkpoint a training run at `step`. Under DDP every process calls it: each one's RNG state and
    data position are gathered (so that all of them resume exactly), rank 0 writes the files, and all
    wait until they are on disk. `val`: the validation made at this step (metadata "val"); `best`: point
    the `best` marker here. Returns the checkpoint path on rank 0, None on the others."""
    device = next(model.parameters()).device
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    data_states, rngs = [data_state], [rng]
    if world > 1:
        data_states, rngs = [None] * world, [None] * world
        dist.all_gather_object(data_states, data_state)
        dist.all_gather_object(rngs, {k: v.cpu() for k, v in rng.items()})
    path = None
    if world == 1 or dist.get_rank() == 0:
        state = {"step": step, "samples_seen": samples_seen, "ema_updates": ema.updates,
                 "optimizer": opt.state_dict(), "rng": rngs, "data": {"world_size": world, "ranks": data_states}}
        extra = {"samples_seen": samples_seen, **({"val": val} if val is not None else {})}
        path = save_checkpoint(out_dir, step, model.state_dict(), ema.module.state_dict(), {**meta, **extra},
                               state, keep=keep, best=best)
    if world > 1:
        dist.barrier()
    return path
