"""``crosschannel transfer seg --engine mmseg``: the same FCN-32s run through mmsegmentation (the optional extra
``pip install 'crosschannel[seg]'``), for people who benchmark in that ecosystem as mmselfsup does.

What runs: the row's backbone is built natively (``transfer.fcn.fcn_backbone``: rescaled, conv1 padded),
exported with the ``backbone.`` prefix (``transfer.export``), and trained by an mmengine ``Runner`` from the config
shipped with the package (``transfer/data/mmseg_fcn32s_voc.py``) with our registered pieces
(``transfer.mmseg_backbone``): ``CrossChannelEncoder`` (forward returns a tuple), ``FCNCropHead`` (zero-init score,
frozen bilinear upsampling, the crop), ``LoadCrossChannelImage`` / ``LoadSegMask`` (the native readers, SBD .mat
too), ``DrawSampler`` (random draws with replacement) and ``SegConfusionMetric`` (``transfer.seg_eval``'s scores).
The image lists are the ones the native engine resolved, written as ``ann_file`` lists into the run folder.
Protocol: batch 1, ``accumulative_counts`` = iter_size / processes, SGD with bias lr x2 / decay x0 (paramwise_cfg),
cross-entropy with ``avg_non_ignore`` (normalised by the valid pixels, as Caffe's ``normalize: true``); mmengine counts
iterations in images, so ``max_iters`` = max_iter x iter_size.

The install's known problems, each handled here explicitly:

* mmsegmentation 1.2.2 asserts ``mmcv < 2.2.0``; PyPI's mmcv 2.1.0 has no wheel for current torch and its source
  build fails, so the extra installs ``mmcv-lite==2.1.0`` (pure Python). Then ``import mmseg.models`` imports
  ``mmcv.ops``, which loads the compiled ``mmcv._ext`` that lite lacks: :func:`install_mmcv_ext_shim` registers a
  stand-in module whose every op raises a one-line error naming the op when *called*. FCN calls none of them (they
  serve deformable convolutions, point sampling for Mask2Former, CARAFE...).
* torch >= 2.6 loads with ``weights_only=True`` by default; mmengine 0.10.7 calls ``torch.load`` without the
  argument, so resuming from mmengine's own checkpoints (which pickle its message hub) fails. Our run folders' files
  are loaded through the ``crosschannel-run://`` scheme (:func:`load_own_checkpoint`) with ``weights_only=False``
  for files inside this run's work folder only; exports (``crosschannel export``) hold plain tensors and load with
  the default.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

from pretext.runtime import UserError, log

INSTALL = ("pip install 'crosschannel[seg]'  (mmsegmentation 1.2.2 with mmcv-lite 2.1.0, mmengine 0.10.7, ftfy, regex; "
           "see the README, 'Segmentation')")
RUN_SCHEME = "crosschannel-run://"
CONFIG = "mmseg_fcn32s_voc.py"  #: the shipped mmengine config (transfer/data/)
_OWN_ROOTS: set[Path] = set()  #: work folders whose checkpoints this process wrote (RUN_SCHEME loads only these)


class _MissingOps(types.ModuleType):
    """Stand-in for mmcv-lite's missing ``mmcv._ext``: any op resolves, and raises when called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*_args, **_kwargs):
            raise RuntimeError(f"mmcv op '{name}' needs mmcv's compiled extension, which mmcv-lite lacks; "
                               "crosschannel's FCN does not use it (install a full mmcv build for models that do)")

        op.__name__ = name
        return op


def install_mmcv_ext_shim() -> bool:
    """Register the stand-in for ``mmcv._ext`` when mmcv has no compiled extension; returns True if it did."""
    if "mmcv._ext" in sys.modules:
        return False
    try:
        if importlib.util.find_spec("mmcv._ext") is not None:
            return False
    except (ImportError, ValueError):
        pass
    stub = _MissingOps("mmcv._ext")
    # a spec without a loader: importlib / pkgutil see a module that is not a compiled extension, so mmengine's
    # mmcv_full_available() answers False (true for mmcv-lite) instead of failing
    stub.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", loader=None)
    sys.modules["mmcv._ext"] = stub
    return True


def require_mmseg():
    """Import mmsegmentation with the shims and register crosschannel's pieces; without the extra, a one-line
    :class:`UserError` saying how to install it."""
    missing = [m for m in ("mmcv", "mmengine", "mmseg") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--engine mmseg needs {', '.join(missing)}: {INSTALL}")
    install_mmcv_ext_shim()
    try:
        importlib.import_module("transfer.mmseg_backbone")  # registers the encoder, head, transforms, metric
    except ImportError as e:
        raise UserError(f"--engine mmseg: cannot import mmsegmentation ({e}); {INSTALL}") from None
    return sys.modules["mmseg"]


def load_own_checkpoint(filename: str, map_location=None):
    """mmengine loader for ``crosschannel-run://<path>``: our own run folder's checkpoints, with
    ``weights_only=False`` (they pickle mmengine's message hub); any other path is refused."""
    import torch

    path = Path(filename[len(RUN_SCHEME):] if filename.startswith(RUN_SCHEME) else filename).resolve()
    if not any(root in path.parents for root in _OWN_ROOTS):
        raise UserError(f"{path}: not a checkpoint of this run's work folder; refusing to unpickle it")
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    return torch.load(path, map_location=map_location, weights_only=False)


def config_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("transfer").joinpath(f"data/{CONFIG}")))


def _write_list(path: Path, ids: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(ids) + "\n")
    return str(path)


def build_config(cfg, run_dir: Path, export: Path, spec: dict, data, head_geometry: tuple[int, int, int],
                 world: int, device_type: str):
    """The shipped config filled in for this run: paths, the exported encoder, the protocol of ``cfg``."""
    from mmengine.config import Config

    train_ds, val_ds, _ = data
    work = run_dir / "mmseg"
    mc = Config.fromfile(str(config_path()))
    tr_img, tr_mask = train_ds.samples[0]
    va_img, va_mask = val_ds.samples[0]
    train = mc.train_dataloader.dataset
    train.update(data_root="", ann_file=_write_list(work / "train.txt", train_ds.ids()),
                 data_prefix=dict(img_path=str(tr_img.parent), seg_map_path=str(tr_mask.parent)),
                 seg_map_suffix=tr_mask.suffix)
    val = mc.val_dataloader.dataset
    val.update(data_root="", ann_file=_write_list(work / "val.txt", val_ds.ids()),
               data_prefix=dict(img_path=str(va_img.parent), seg_map_path=str(va_mask.parent)), seg_map_suffix=".png")
    mc.test_dataloader = mc.val_dataloader
    local = cfg.iter_size // world
    mc.train_dataloader.sampler.update(mode=cfg.sampling, draw_seed=cfg.seed)
    for dl in (mc.train_dataloader, mc.val_dataloader):
        dl.num_workers = cfg.workers
        dl.persistent_workers = cfg.workers > 0
    stride, kernel, offset = head_geometry
    mc.model.backbone.update(spec=spec, checkpoint=str(export), dropout=cfg.dropout)
    mc.model.decode_head.update(in_channels=spec["num_features"], channels=spec["num_features"], stride=stride,
                                kernel=kernel, offset=offset)
    mc.custom_hooks = [dict(type="StopOnSignalHook", accumulative_counts=local)]
    mc.optim_wrapper.update(accumulative_counts=local,
                            type="AmpOptimWrapper" if device_type == "cuda" and cfg.amp != "none" else "OptimWrapper")
    if mc.optim_wrapper.type == "AmpOptimWrapper":  # the native engine's choice (pretext.runtime.autocast_dtype)
        import torch

        from pretext.runtime import autocast_dtype

        mc.optim_wrapper.dtype = str(autocast_dtype(cfg.amp, torch.device("cuda"))).removeprefix("torch.")
    mc.optim_wrapper.optimizer.update(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    mc.optim_wrapper.paramwise_cfg = dict(bias_lr_mult=cfg.bias_lr_mult,
                                          bias_decay_mult=1.0 if cfg.bias_decay else 0.0)
    per = cfg.iter_size // world  # images per process per update: mmengine's iterations
    mc.param_scheduler = [dict(type="MultiStepLR", by_epoch=False, milestones=[m * per for m in cfg.lr_milestones],
                               gamma=cfg.lr_gamma)] if cfg.lr_milestones else []
    max_iters = cfg.max_iter * per
    mc.train_cfg.update(max_iters=max_iters, val_interval=cfg.eval_every * per if cfg.eval_every else max_iters)
    mc.default_hooks.checkpoint.update(interval=cfg.checkpoint_every * per)
    mc.default_hooks.logger.update(interval=cfg.log_every * per)
    mc.val_evaluator.update(pred_dir=str(run_dir / "predictions") if cfg.save_predictions else None,
                            vis=cfg.vis_images)
    mc.test_evaluator = mc.val_evaluator
    mc.randomness = dict(seed=cfg.seed)
    mc.env_cfg.dist_cfg = dict(backend="nccl" if device_type == "cuda" else "gloo")
    mc.launcher = "pytorch" if world > 1 else "none"
    if cfg.tensorboard:
        mc.visualizer.vis_backends = [dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")]
    mc.work_dir = str(work)
    return mc


def _one_line(e: BaseException) -> str:
    """The message of a UserError raised in a DataLoader worker (re-raised with the worker's traceback)."""
    text = str(e).strip().splitlines()
    last = text[-1] if text else str(e)
    return last.split("UserError: ", 1)[-1]


def run_mmseg(cfg, row: str, run_dir: Path, resume: str | None, data, dist_info, device, stop, allow_change):
    """Fine-tune and evaluate one row with mmsegmentation; returns its results or the exit code after a signal."""
    import torch

    from pretext.runtime import all_gather_objects, barrier, check_resume_config, config_to_dict, load_checkpoint, \
        save_checkpoint

    require_mmseg()
    from mmengine.runner import Runner

    from . import mmseg_backbone as mb
    from .export import backbone_spec, mmseg_state
    from .seg_eval import published_mIoU, scores
    from .fcn import upsample_geometry
    from .seg_data import init_batch
    from .segmentation import GUARDED, PUBLISHED_METHOD, build_model, write_run_outputs

    train_ds, val_ds, notes = data
    work = (run_dir / "mmseg").resolve()
    _OWN_ROOTS.add(work)
    export = run_dir / "backbone_mmseg.pth"
    state_file = run_dir / "crosschannel_state.pth"  # our config and the backbone's origin, for --resume
    last = work / "last_checkpoint"
    resume_from = None
    if resume:
        resume_from = last.read_text().strip() if Path(resume).resolve() == last.resolve() else str(resume)
        if work not in Path(resume_from).resolve().parents or not Path(resume_from).is_file():
            raise UserError(f"{resume_from}: not an mmseg checkpoint of this run ({work}/iter_*.pth)")
        old = load_checkpoint(state_file)
        done = re.search(r"iter_(\d+)\.pth$", resume_from)
        check_resume_config(old["config"], config_to_dict(cfg), GUARDED, allow_change, run_dir,
                            int(done.group(1)) // max(1, cfg.iter_size // dist_info.world_size) if done else 0)
        info = old["backbone_info"]
        log.info("%s: resuming mmengine's checkpoint %s", run_dir.name, resume_from)
    if not export.is_file() or not resume:
        needs_images = (row == "colorization" and cfg.rescale) or (row == "random" and cfg.random_init != "gaussian")
        images = init_batch(train_ds, cfg.init_images, cfg.seed) if needs_images else None
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, row, images, resume=False)
        if dist_info.is_main:
            save_checkpoint(mmseg_state(model.backbone), export)
        info = dict(model.backbone.info)
        spec = backbone_spec(model.backbone)
        geometry = (model.upscore.stride, model.upscore.kernel, model.upscore.offset)
        del model
    else:
        from .export import load_export, skeleton

        spec = load_export(export)["meta"]["crosschannel"]["spec"]
        geometry = upsample_geometry(skeleton(spec), cfg.upsample_kernel, cfg.crop_offset)
    if dist_info.is_main:
        save_checkpoint({"config": config_to_dict(cfg), "backbone_info": info, "row": row, "iter": 0}, state_file)
    barrier()
    mc = build_config(cfg, run_dir, export, spec, data, geometry, dist_info.world_size, device.type)
    if resume_from:
        mc.load_from, mc.resume = RUN_SCHEME + resume_from, True
    mb.STOP["signal"] = stop
    try:
        runner = Runner.from_cfg(mc)
        runner.train()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a UserError from a DataLoader worker comes back wrapped
        if "UserError" in type(e).__name__ or "UserError:" in str(e):
            raise UserError(_one_line(e)) from None
        raise
    finally:
        mb.STOP["signal"] = None
    if stop.requested:
        return stop.exit_code
    metric = runner.val_evaluator.metrics[0]
    hists = [h for h in all_gather_objects(metric.last) if h is not None]  # computed on the main process
    if not hists:
        raise RuntimeError(f"{run_dir.name}: mmseg finished without an evaluation")
    hist = hists[0]
    samples = sorted((s for part in all_gather_objects(metric.samples) for s in part), key=lambda s: s[0])
    res = {"row": row, "input": cfg.input, "engine": "mmseg", "iterations": cfg.max_iter, **scores(hist),
           "images": len(val_ds), "num_train": len(train_ds), "data": notes,
           "upsampling": dict(zip(("stride", "kernel", "offset"), geometry)),
           "published_mIoU": published_mIoU(PUBLISHED_METHOD[row], cfg.input), "backbone": info,
           "mmseg_work_dir": str(work), "hist": hist.tolist()}
    if dist_info.is_main:
        write_run_outputs(run_dir, res, samples[: cfg.vis_images])
    barrier()
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m transfer.mmseg_engine CONFIG [--work-dir DIR]``: train from an mmseg config that uses our pieces
    (the shim is installed before mmseg's models are imported, which mmseg's own tools/train.py does not do)."""
    import argparse

    p = argparse.ArgumentParser("transfer.mmseg_engine", description=main.__doc__)
    p.add_argument("config")
    p.add_argument("--work-dir")
    args = p.parse_args(argv)
    require_mmseg()
    from mmengine.config import Config
    from mmengine.runner import Runner

    mc = Config.fromfile(args.config)
    mc.work_dir = args.work_dir or mc.get("work_dir") or str(Path("work_dirs") / Path(args.config).stem)
    os.makedirs(mc.work_dir, exist_ok=True)
    Runner.from_cfg(mc).train()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        log.error("%s", e)
        sys.exit(2)
