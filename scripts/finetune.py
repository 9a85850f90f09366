"""What `make finetune-kitti` and `make finetune-nyu` run: shards -> fine-tune -> evaluate, in one command.

    python scripts/finetune.py kitti --root /data/kitti [--teacher ID|DIR] [--init CKPT] [--model NAME]
        [--steps N] [--out runs/finetune-kitti] [--shards shards] [--crop HxW] [--eval-crop HxW] ...

1. Checks everything that can be checked cheaply (the data set's layout for both splits, the teacher,
   --init, the run directory) before any work, and fails with a message, never a traceback.
2. `datagen run` for the training split and the evaluation split, each into its own folder (a datagen
   output folder holds one job's settings). Rerunning is how finished shards are reused: datagen skips
   shards whose sidecar says they are done and starts neither Ray nor the teacher when nothing is left.
3. `trainer finetune --resume` on the training shards: a killed run continues where it stopped; a run
   directory whose latest checkpoint already reached the steps asked for is not trained again.
4. `trainer eval` on the evaluation shards, writing OUT/eval-<split>.json.

Every step is a subprocess of the same interpreter, so the trainer never shares a process with datagen.
Empty strings mean "not given": the Makefile passes every variable, set or not.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from datagen.sources import SOURCES, LayoutError, get_source
from datagen.teachers.runner import DEFAULT_TEACHER, TeacherUnavailable, resolve_teacher
from trainer.checkpoint import latest_checkpoint, read_metadata


@dataclass(frozen=True)
class Dataset:
    source: str  # datagen source name (also the shards' subfolder)
    train_split: str
    eval_split: str
    kind: str  # trainer eval --kind
    crop: str | None  # default training crop; None: the preset's
    eval_crop: str | None  # default eval crop; None: the whole frame padded to a multiple of 32
    root_var: str  # the make variable that names the root, for messages


DATASETS = {
    # KITTI: the preset's crop (laptop 128x256, paper BP-Net's 256x1216); val_selection_cropped frames are
    # 352 x 1216, already a multiple of 32, and are scored whole, as the official devkit does.
    "kitti": Dataset("kitti", "train", "val_selection_cropped", "kitti", None, None, "KITTI_ROOT"),
    # NYU: shards keep the 640 x 480 frame and the trainer only crops, never resizes. BP-Net halves the
    # frame and crops 228 x 304 (95% x 95% of it); the same field of view at full size, in multiples of
    # 32, is 448 x 608. 480 x 640 needs no padding, so evaluation takes the whole frame.
    "nyu": Dataset("nyu", "train", "val", "nyu", "448x608", None, "NYU_ROOT"),
}


class Failure(Exception):
    """Stop with this message and exit code (no traceback)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _given(value: str | None) -> str | None:
    return value if value not in (None, "") else None


def shard_dir(shards_root: Path, ds: Dataset, split: str) -> Path:
    """`datagen run --out <shards_root>/<source>-<split>` writes its tars to <that>/<source>/."""
    return shards_root / f"{ds.source}-{split}" / ds.source


# -----------------------------------------------------------------------------
# checks before any work


def check_layout(ds: Dataset, root: str | None) -> None:
    """The source's own LayoutError text (which shows the tree expected) for both splits."""
    if root is None:
        layout = SOURCES[ds.source].layout
        raise Failure(f"{ds.root_var} is not set: make finetune-{ds.source} {ds.root_var}=/path/to/{ds.source}\n"
                      f"Expected the {ds.source} layout:\n{layout}")
    for split in (ds.train_split, ds.eval_split):
        try:
            get_source(ds.source, root, split=split).check_layout()
        except LayoutError as exc:
            raise Failure(f"{ds.root_var}={root}: {exc}") from exc


def check_teacher(teacher: str | None) -> str:
    teacher = teacher or DEFAULT_TEACHER
    try:
        resolve_teacher(teacher)
    except TeacherUnavailable as exc:
        raise Failure(f"TEACHER={teacher}: {exc}") from exc
    return teacher


def latest_checkpoint_meta(out: Path) -> tuple[int, dict] | None:
    """(step, train_config) of the checkpoint `trainer --resume` would continue from, None when there is none."""
    path = latest_checkpoint(out)
    if path is None:
        return None
    meta = read_metadata(path)
    return int(meta.get("step", 0)), meta.get("train_config", {})


def finished_run(out: Path, init: str | None, model: str | None, steps: str | None) -> int | None:
    """--resume continues whatever OUT holds: refuse a run that started from another INIT or MODEL.
    Returns the step reached when OUT already holds the finished run (nothing to train), else None."""
    found = latest_checkpoint_meta(out)
    if found is None:
        return None
    step, old = found
    if old.get("stage") != "finetune":
        raise Failure(f"OUT={out} holds a {old.get('stage')} run; use another OUT for fine-tuning")
    same_init = (old.get("init") is None and init is None) or (
        old.get("init") is not None and init is not None and Path(old["init"]).resolve() == Path(init).resolve())
    if not same_init or (model is not None and old.get("model") != model):
        what = f"INIT={old.get('init')!r}" if not same_init else f"MODEL={old.get('model')!r}"
        raise Failure(f"OUT={out} holds a fine-tune with {what}, which this run does not ask for: "
                      "use another OUT or remove that folder")
    target = int(steps) if steps is not None else int(old.get("steps", 0))
    return step if step >= target else None


# -----------------------------------------------------------------------------
# the three steps


def run_step(cmd: list[str], what: str) -> None:
    print("+ " + shlex.join(cmd[2:] if cmd[1] == "-m" else cmd), file=sys.stderr, flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise Failure(f"{what} failed (exit code {rc}); its message is above", code=rc if rc > 0 else 1)


def make_shards(ds: Dataset, root: str, split: str, shards_root: Path, teacher: str, extra: list[str]) -> Path:
    out = shards_root / f"{ds.source}-{split}"
    run_step([sys.executable, "-m", "datagen.cli", "run", "--source", ds.source, "--root", root,
              "--out", str(out), "--teacher", teacher, "-o", f"split={split}", *extra], f"datagen run ({split})")
    tars = sorted(shard_dir(shards_root, ds, split).glob("*.tar"))
    if not tars:
        raise Failure(f"datagen wrote no samples for split {split}: every input failed, see "
                      f"{shard_dir(shards_root, ds, split) / 'failures.parquet'}")
    return shard_dir(shards_root, ds, split)


def finetune(shards: Path, out: Path, init, model, steps, crop, args) -> None:
    cmd = [sys.executable, "-m", "trainer.cli", "finetune", "--shards", str(shards), "--out", str(out),
           "--resume", "--json", str(out / "finetune.json")]
    for flag, value in (("--init", init), ("--model", model), ("--steps", steps), ("--crop", crop),
                        ("--preset", _given(args.preset)), ("--batch-size", _given(args.batch_size))):
        if value is not None:
            cmd += [flag, value]
    run_step(cmd + shlex.split(args.train_args), "trainer finetune")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("--root", default="", help="the data set's folder (docs/datasets.md)")
    p.add_argument("--teacher", default="", help="hub id or folder (default: datagen's DEFAULT_TEACHER)")
    p.add_argument("--init", default="", help="checkpoint, run directory, export or original .pth")
    p.add_argument("--model", default="", help="bpnet, bpnet-s, tiny (default: INIT's network, else bpnet-s)")
    p.add_argument("--steps", default="", help="optimizer steps (default: the preset's)")
    p.add_argument("--out", default="", help="run directory (default runs/finetune-<dataset>)")
    p.add_argument("--shards", default="", help="shards root (default shards)")
    p.add_argument("--crop", default="", help="training crop HxW (default: kitti the preset's, nyu 448x608)")
    p.add_argument("--eval-crop", default="", help="eval crop HxW, bottom-centred (default: the whole frame)")
    p.add_argument("--preset", default="", help="trainer preset: laptop (default) or paper")
    p.add_argument("--batch-size", default="", help="global batch (default: the preset's)")
    p.add_argument("--datagen-args", default="", help="more `datagen run` options, one shell-quoted string")
    p.add_argument("--train-args", default="", help="more `trainer finetune` options, one shell-quoted string")
    args = p.parse_args(argv)
    ds = DATASETS[args.dataset]
    name = f"finetune-{ds.source}"
    try:
        root, init, model = _given(args.root), _given(args.init), _given(args.model)
        steps = _given(args.steps)
        if steps is not None and not (steps.isdigit() and int(steps) > 0):
            raise Failure(f"STEPS must be a positive integer, got {steps!r}")
        out = Path(_given(args.out) or f"runs/{name}")
        shards_root = Path(_given(args.shards) or "shards")
        crop = _given(args.crop) or ds.crop
        eval_crop = _given(args.eval_crop) or ds.eval_crop
        check_layout(ds, root)
        teacher = check_teacher(_given(args.teacher))
        if init is not None and not Path(init).exists():
            raise Failure(f"INIT={init} does not exist (a checkpoint, run directory, export or .pth)")
        done_step = finished_run(out, init, model, steps)

        try:
            datagen_extra = shlex.split(args.datagen_args)
            shlex.split(args.train_args)
        except ValueError as exc:
            raise Failure(f"DATAGEN_ARGS / TRAIN_ARGS: {exc}") from exc
        train_shards = make_shards(ds, root, ds.train_split, shards_root, teacher, datagen_extra)
        eval_shards = make_shards(ds, root, ds.eval_split, shards_root, teacher, datagen_extra)

        if done_step is not None:
            print(f"{out} is fine-tuned already (step {done_step}): not training again", file=sys.stderr)
        else:
            finetune(train_shards, out, init, model, steps, crop, args)

        result = out / f"eval-{ds.eval_split}.json"
        cmd = [sys.executable, "-m", "trainer.cli", "eval", "--ckpt", str(out), "--shards", str(eval_shards),
               "--kind", ds.kind, "--json", str(result)]
        if eval_crop is not None:
            cmd += ["--crop", eval_crop]
        run_step(cmd, "trainer eval")
    except Failure as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{name}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    print(f"{name}: done. checkpoints in {out}, metrics in {result}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
