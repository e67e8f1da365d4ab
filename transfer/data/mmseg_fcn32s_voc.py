# FCN-32s on a crosschannel encoder, PASCAL VOC: SBD train (8,498 images) -> VOC2011 seg11valid (736 images), the
# protocol of shelhamer/fcn.berkeleyvision.org voc-fcn-alexnet as richzhang/colorization
# feature_learning_tests/segmentation runs it, in mmsegmentation terms (see PROVENANCE.md, "Transfer: VOC
# segmentation"). `crosschannel transfer seg --engine mmseg` fills in the paths, the exported encoder (spec,
# checkpoint), the head geometry and the protocol of its config; to use this file directly, set those below and run
#     python -m transfer.mmseg_engine this_file.py --work-dir work_dirs/fcn32s
# (not mmseg's tools/train.py: mmcv-lite needs crosschannel's shim before mmseg's models are imported).
custom_imports = dict(imports=["transfer.mmseg_backbone"], allow_failed_imports=False)
default_scope = "mmseg"

sbd_root = "data/benchmark_RELEASE/dataset"  # img/*.jpg, cls/*.mat, train.txt
voc_root = "data/VOCdevkit/VOC2011"  # JPEGImages/, SegmentationClass/
iter_size = 20  # images per update (batch 1 each); mmengine counts iterations in images
max_updates = 100000

# the network sees RGB in [0, 1]; the encoder converts it to L (or Lab) as in pretraining
data_preprocessor = dict(type="SegDataPreProcessor", mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0],
                         bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size_divisor=1)  # batch 1: no padding
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    # checkpoint: `crosschannel export --format mmseg -o backbone_mmseg.pth`; spec None: the one in its metadata
    backbone=dict(type="CrossChannelEncoder", spec=None, checkpoint="backbone_mmseg.pth", dropout=0.5),
    decode_head=dict(
        type="FCNCropHead", in_channels=4096, channels=4096, num_classes=21,
        stride=32, kernel=63, offset=18,  # voc-fcn-alexnet upscore (kernel 63, stride 32) and crop (offset 18)
        dropout_ratio=0.0, ignore_index=255, align_corners=False,
        # SoftmaxWithLoss {ignore_label: 255, normalize: true}: mean over the non-void pixels
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True)),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"))

# whole images, no augmentation (voc_layers.py), batch 1
train_pipeline = [dict(type="LoadCrossChannelImage"), dict(type="LoadSegMask"), dict(type="PackSegInputs")]
test_pipeline = [dict(type="LoadCrossChannelImage"), dict(type="LoadSegMask"), dict(type="PackSegInputs")]
train_dataloader = dict(
    batch_size=1, num_workers=4, persistent_workers=True,
    sampler=dict(type="DrawSampler", mode="random", draw_seed=0),  # random draws with replacement (voc_layers.py)
    dataset=dict(type="PascalVOCDataset", data_root=sbd_root, data_prefix=dict(img_path="img", seg_map_path="cls"),
                 seg_map_suffix=".mat", ann_file="train.txt", pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=4, persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(type="PascalVOCDataset", data_root=voc_root,
                 data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
                 ann_file="{{fileDirname}}/seg11valid.txt", pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type="SegConfusionMetric", pred_dir=None, vis=0)
test_evaluator = val_evaluator

# SGD lr 1e-4 fixed, momentum 0.9, weight decay 5e-4; biases lr x2, no decay (richzhang train_val.prototxt);
# gradients accumulated over iter_size images (solver.prototxt iter_size: 20)
optim_wrapper = dict(type="OptimWrapper", accumulative_counts=iter_size,
                     optimizer=dict(type="SGD", lr=1e-4, momentum=0.9, weight_decay=5e-4),
                     paramwise_cfg=dict(bias_lr_mult=2.0, bias_decay_mult=0.0))
param_scheduler = []  # lr_policy: "fixed"
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_updates * iter_size, val_interval=4000 * iter_size)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
custom_hooks = [dict(type="StopOnSignalHook", accumulative_counts=iter_size)]
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=20 * iter_size, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=4000 * iter_size, max_keep_ckpts=2),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook", draw=False))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="nccl"))
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0)
