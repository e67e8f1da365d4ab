"""crosschannel's pieces registered in mmsegmentation (the ``seg`` extra; imported by
``transfer.mmseg_engine.require_mmseg`` and by the shipped config's ``custom_imports``).

* ``CrossChannelEncoder`` (MODELS): the transfer backbone as an mmseg backbone. It takes what ``SegDataPreProcessor``
  gives with ``mean=0, std=255, bgr_to_rgb=True`` (RGB in [0, 1]), converts it to the network input (L or Lab,
  ``TransferNet.prepare``) and returns a tuple holding its last feature map. Built from a ``spec``
  (``transfer.export.backbone_spec``; default: the one in ``checkpoint``'s metadata); ``checkpoint`` (an export with
  ``backbone.`` keys) is loaded strictly in ``init_weights``, naming missing and unexpected keys; ``dropout`` is
  drop6 / drop7's. Its state-dict keys are the TransferNet's.
* ``FCNCropHead`` (MODELS): FCN-32s's head: ``conv_seg`` is the 1x1 score layer (zero init, as Caffe's default
  filler), then the frozen bilinear upsampling cropped to the input (``transfer.fcn.BilinearUpsample``),
  so that mmseg's resize to the label size is the identity.
* ``LoadCrossChannelImage`` / ``LoadSegMask`` (TRANSFORMS): the native readers (``pretext.data.read_image``;
  ``transfer.voc.read_mask`` for PNG, ``transfer.seg_data.read_sbd_mask`` for SBD .mat), with their one-line
  errors naming the file.
* ``DrawSampler`` (DATA_SAMPLERS): the native engine's image stream (random draws with replacement, or shuffled
  passes), infinite, split over the processes as the native engine splits it.
* ``SegConfusionMetric`` (METRICS): one confusion matrix over the split and ``transfer.seg_eval.scores``; keeps the
  matrix (``last``), a few samples for the figure, and writes prediction PNGs.
* ``StopOnSignalHook`` (HOOKS): SIGTERM / SIGINT / SIGUSR1 (``pretext.runtime.GracefulStop``) end training after a
  whole update, all processes agreeing, with a checkpoint.
"""
from __future__ import annotations

from pathlib import Path

from .mmseg_engine import install_mmcv_ext_shim

install_mmcv_ext_shim()  # before mmseg.models imports mmcv.ops

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmcv.transforms import BaseTransform  # noqa: E402
from mmengine.evaluator import BaseMetric  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import BaseModule  # noqa: E402
from mmengine.runner import CheckpointLoader  # noqa: E402
from mmengine.dist import get_dist_info  # noqa: E402
from mmseg.models.decode_heads.decode_head import BaseDecodeHead  # noqa: E402
from mmseg.registry import DATA_SAMPLERS, HOOKS, METRICS, MODELS, TRANSFORMS  # noqa: E402

from pretext.runtime import UserError, any_process  # noqa: E402

from .export import load_backbone_weights, load_export, skeleton  # noqa: E402
from .mmseg_engine import RUN_SCHEME, load_own_checkpoint  # noqa: E402
from .seg_eval import confusion, save_prediction, scores  # noqa: E402
from .fcn import BilinearUpsample  # noqa: E402
from .seg_data import read_sbd_mask, sample_index  # noqa: E402
from .voc import read_mask  # noqa: E402

STOP: dict = {"signal": None}  #: the run's GracefulStop, set by transfer.mmseg_engine.run_mmseg
CheckpointLoader.register_scheme(prefixes=RUN_SCHEME, force=True)(load_own_checkpoint)


@MODELS.register_module()
class CrossChannelEncoder(BaseModule):
    """A crosschannel transfer backbone as an mmseg backbone: RGB in [0, 1] -> ``(features,)``."""

    def __init__(self, spec: dict | None = None, checkpoint: str | None = None, dropout: float = 0.5, init_cfg=None):
        super().__init__(init_cfg)
        if spec is None:
            if not checkpoint:
                raise UserError("CrossChannelEncoder needs a spec or an exported checkpoint (crosschannel export)")
            spec = load_export(checkpoint)["meta"]["crosschannel"]["spec"]
        net = skeleton(spec)
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = dropout  # drop6 / drop7
        # the TransferNet's modules are registered here directly (same objects), so the keys are the TransferNet's
        for name, module in net.named_children():
            self.add_module(name, module)
        object.__setattr__(self, "_net", net)  # its forward logic, without registering it a second time
        self.checkpoint = checkpoint

    def init_weights(self) -> None:
        if self.checkpoint:
            load_backbone_weights(self._net, load_export(self.checkpoint), self.checkpoint)
            self._is_init = True
        else:
            super().init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self._net(self._net.prepare(x)),)


@MODELS.register_module()
class FCNCropHead(BaseDecodeHead):
    """1x1 score (zero init) -> frozen bilinear x``stride`` upsampling (``kernel``) -> crop at ``offset`` to the
    input (padded) size."""

    def __init__(self, stride: int, kernel: int, offset: int, **kwargs):
        kwargs.setdefault("dropout_ratio", 0.0)  # drop6 / drop7 are in the backbone
        kwargs.setdefault("init_cfg", dict(type="Constant", val=0.0, bias=0.0, override=dict(name="conv_seg")))
        super().__init__(**kwargs)
        self.upscore = BilinearUpsample(self.out_channels, stride, kernel, offset)

    def forward(self, inputs):
        return self.cls_seg(self._transform_inputs(inputs))

    def loss(self, inputs, batch_data_samples, train_cfg) -> dict:
        size = batch_data_samples[0].metainfo.get("pad_shape") or batch_data_samples[0].metainfo["img_shape"]
        return self.loss_by_feat(self.upscore(self.forward(inputs), tuple(size)[:2]), batch_data_samples)

    def predict(self, inputs, batch_img_metas, test_cfg):
        meta = batch_img_metas[0]
        size = meta.get("pad_shape") or meta["img_shape"]
        return self.predict_by_feat(self.upscore(self.forward(inputs), tuple(size)[:2]), batch_img_metas)


@TRANSFORMS.register_module()
class LoadCrossChannelImage(BaseTransform):
    """``img_path`` -> ``img`` (H, W, 3) uint8 BGR (mmseg's order), decoded as the native engine decodes it."""

    def transform(self, results: dict) -> dict:
        from pretext.data import UnreadableImage, read_image

        try:
            rgb = np.asarray(read_image(results["img_path"]), np.uint8)
        except UnreadableImage as e:
            raise UserError(str(e)) from None
        results["img"] = np.ascontiguousarray(rgb[:, :, ::-1])
        results["img_shape"] = results["ori_shape"] = rgb.shape[:2]
        return results


@TRANSFORMS.register_module()
class LoadSegMask(BaseTransform):
    """``seg_map_path`` (VOC palette PNG or SBD .mat) -> ``gt_seg_map`` (H, W) uint8, checked against the image."""

    def transform(self, results: dict) -> dict:
        path = Path(results["seg_map_path"])
        h, w = results["img_shape"][:2]
        mask = read_sbd_mask(path, (w, h)) if path.suffix == ".mat" else read_mask(path, (w, h))
        results["gt_seg_map"] = mask
        results.setdefault("seg_fields", []).append("gt_seg_map")
        return results


@DATA_SAMPLERS.register_module()
class DrawSampler(torch.utils.data.Sampler):
    """Infinite stream of ``transfer.seg_data.sample_index(draw_seed, pos, n, mode)`` for positions
    ``rank, rank + world, ...`` (mmengine passes ``dataset`` and its own ``seed``, unused)."""

    def __init__(self, dataset, mode: str = "random", draw_seed: int = 0, seed=None):
        self.n, self.mode, self.draw_seed = len(dataset), mode, draw_seed
        self.rank, self.world = get_dist_info()

    def __iter__(self):
        cache: dict = {}
        pos = self.rank
        while True:
            yield sample_index(self.draw_seed, pos, self.n, self.mode, cache)
            pos += self.world

    def __len__(self) -> int:
        return self.n


@METRICS.register_module()
class SegConfusionMetric(BaseMetric):
    """``transfer.seg_eval.scores`` of one confusion matrix over the split (mIoU etc. in %, as mmseg logs them)."""

    default_prefix = "crosschannel"

    def __init__(self, pred_dir: str | None = None, vis: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.pred_dir = Path(pred_dir) if pred_dir else None
        self.vis = vis
        self.last: np.ndarray | None = None
        self.samples: list = []
        self._seen = 0

    def process(self, data_batch, data_samples) -> None:
        for ds in data_samples:
            pred = ds["pred_sem_seg"]["data"].squeeze(0)
            gt = ds["gt_sem_seg"]["data"].squeeze(0).to(pred.device)
            self.results.append(confusion(gt, pred).cpu().numpy())
            name = Path(ds["img_path"]).stem
            if self.pred_dir is not None:
                save_prediction(pred.cpu().numpy(), self.pred_dir / f"{name}.png")
            if len(self.samples) < self.vis:
                from pretext.data import read_image

                rgb = np.asarray(read_image(ds["img_path"]), np.uint8)
                self.samples.append((name, rgb, gt.cpu().numpy().astype(np.uint8), pred.cpu().numpy().astype(np.uint8)))

    def compute_metrics(self, results: list) -> dict:
        hist = np.sum(results, axis=0)
        self.last = hist
        s = scores(hist)
        return {"mIoU": 100 * s["mIoU"], "aAcc": 100 * s["pixel_acc"], "mAcc": 100 * s["mean_acc"],
                "fwIoU": 100 * s["fwIoU"]}


@HOOKS.register_module()
class StopOnSignalHook(Hook):
    """After each whole update (``accumulative_counts`` images), stop if any process got a stop signal: checkpoint
    (``iter_<n>.pth`` and ``last_checkpoint``, as mmengine's CheckpointHook writes them) and end the loop."""

    priority = "VERY_LOW"

    def __init__(self, accumulative_counts: int = 1):
        self.every = accumulative_counts

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        stop = STOP.get("signal")
        if (runner.iter + 1) % self.every:
            return
        device = next(runner.model.parameters()).device
        if any_process([bool(stop is not None and stop.requested)], device)[0]:
            name = f"iter_{runner.iter + 1}.pth"
            runner.save_checkpoint(runner.work_dir, name, save_optimizer=True, save_param_scheduler=True)
            if runner.rank == 0:
                Path(runner.work_dir, "last_checkpoint").write_text(str(Path(runner.work_dir, name)))
            runner.train_loop.stop_training = True
