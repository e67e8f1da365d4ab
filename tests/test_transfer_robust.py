"""Bad settings for every transfer trainer (``crosschannel transfer cls | det | seg``), one table: each is refused
in seconds with exit code 2, one line on stderr that names the problem, no traceback, and no run folder created
(issue 11, item 8). Every row runs the real CLI (``pretext.cli.main``) in this process, stderr captured at the file
descriptor (log handlers and warnings included); a few rows, one per task and a run folder that is a file, also run
as a real ``python -m pretext.cli`` process (a Python start-up costs seconds: the whole table that way took ~13 min).

The inputs are real: the three VOC2012 images of ../shared/data/voc_sample (no split files: every image in both
splits) and a small random-init pretext AlexNet checkpoint."""
import time
from pathlib import Path

import pytest
from test_transfer_backbone import write_pretext_checkpoint
from test_voc import SHARED

BBOX = SHARED / "voc_sample" / "bbox_detection"
SEG = SHARED / "voc_sample" / "semantic_segmentation"

pytestmark = pytest.mark.skipif(not (SHARED / "voc_sample").is_dir(), reason="../shared/data/voc_sample not present")


def _sets(**kw) -> list[str]:
    return [a for k, v in kw.items() for a in ("--set", f"{k}={v}")]


# a valid tiny run of each task (what every case below starts from); {out} and {ckpt} are filled in per case. Data
# and checkpoint go through --set, not --voc / --checkpoint (which win over --set), so that a case can replace them
BASE = {
    "cls": ["transfer", "cls",
            *_sets(voc=BBOX, checkpoint="{ckpt}", labels="xml", fallback_split="all", freeze="[fc8]", batch_size=3, max_iter=1, workers=0,
                   eval_passes=1, progress="false", tensorboard="false", rescale="false", device="cpu")],
    "det": ["transfer", "det",
            *_sets(voc=BBOX, rows="random", fc_dim=16, fallback_split="all", train_scales="[64]", test_scale=64, max_iter=1,
                   rois_per_batch=32, workers=0, progress="false", tensorboard="false", coco="false", device="cpu")],
    "seg": ["transfer", "seg",
            *_sets(voc=SEG, rows="random", fc_dim=16, train_data="voc", train_split="all", val_split="all", max_iter=1,
                   iter_size=1, workers=0, progress="false", tensorboard="false", device="cpu")],
}
ALL = ("cls", "det", "seg")

# (tasks, case, extra arguments, what the one line must contain); {out} is the run folder that must not appear,
# {file} a plain file, {ckpt} the pretext checkpoint, {missing} a path that does not exist. What every trainer must
# handle on its own (data, backbone sources, run folder, resume) runs for all three; a plain range check, which the
# shared config code does the same way for every key, runs for one task each
CASES = [
    (ALL, "lr negative", _sets(lr=-1), "'lr': must be > 0"),
    (ALL, "lr NaN", _sets(lr="nan"), "'lr': must be a finite number"),
    (("det",), "lr inf", _sets(lr="inf"), "'lr': must be a finite number"),
    (("seg",), "lr not a number", _sets(lr="fast"), "'lr': expected a number"),
    (("cls",), "momentum 1", _sets(momentum=1), "'momentum': must be < 1"),
    (("det",), "weight decay negative", _sets(weight_decay=-1e-4), "'weight_decay': must be >= 0"),
    (ALL, "workers negative", _sets(workers=-1), "'workers': must be >= 0"),
    (("seg",), "max_iter 0", _sets(max_iter=0), "'max_iter': must be >= 1"),
    (("cls",), "checkpoint_every 0", _sets(checkpoint_every=0), "'checkpoint_every': must be >= 1"),
    (("det",), "dropout 1", _sets(dropout=1), "'dropout': must be < 1"),
    (("seg",), "seed negative", _sets(seed=-3), "'seed': must be >= 0"),
    (("cls",), "amp fp8", _sets(amp="fp8"), "'amp': must be one of"),
    (ALL, "unknown key", _sets(learning_rate=0.1), "unknown config key 'learning_rate'"),
    (ALL, "unknown backbone row", _sets(rows="[imagenet]"), "'rows': must be one of"),
    (ALL, "unknown random init", _sets(random_init="xavier"), "'random_init': must be one of"),
    (("det",), "input rgb", _sets(input="rgb"), "'input': must be one of"),
    (ALL, "supervised row without weights", _sets(rows="[supervised]"), "needs torchvision weights"),
    (ALL, "supervised architecture unknown", _sets(rows="[supervised]", supervised="resnet50:{file}"),
     "architecture must be one of"),
    (ALL, "supervised weights missing", _sets(rows="[supervised]", supervised="alexnet:{missing}"), "{missing}"),
    (ALL, "colorization row without checkpoint", _sets(rows="[colorization]", checkpoint=""),
     "needs a pretext checkpoint"),
    (ALL, "checkpoint missing", _sets(rows="[colorization]", checkpoint="{missing}"), "{missing}"),
    (ALL, "checkpoint not a checkpoint", _sets(rows="[colorization]", checkpoint="{file}"), "{file}"),
    (ALL, "missing VOC root", _sets(voc="{missing}"), "{missing}"),
    (ALL, "VOC root is a file", _sets(voc="{file}"), "{file}"),
    (("seg",), "config file missing", ["-c", "{missing}"], "config file not found"),
    (ALL, "out_dir is a file", _sets(out_dir="{file}"), "is a file, not a folder"),
    (ALL, "out_dir under a file", _sets(out_dir="{file}/run"), "is a file, not a folder"),
    (ALL, "device unknown", _sets(device="tpu7"), "device"),
    (ALL, "resume from a pretext checkpoint", ["--resume", "{ckpt}"], "{ckpt}"),
    (("cls",), "crop 7", _sets(crop=7), "'crop': must be >= 32"),
    (("cls",), "crop 100000", _sets(crop=100000), "'crop': must be <= 1024"),
    (("cls",), "crop too small for AlexNet", _sets(crop=100), "crop 100 px is too small for alexnet_cc"),
    (("cls",), "crop too large for fc6", _sets(crop=300), "crop 300 px gives a 4x4 fc7 map"),
    (("cls",), "batch_size 0", _sets(batch_size=0), "'batch_size': must be >= 1"),
    (("cls",), "min_scale > max_scale", _sets(min_scale=3), "min_scale <= max_scale"),
    (("cls",), "freeze level unknown", _sets(freeze="[fc7]"), "'freeze': must be one of"),
    (("cls",), "eval_passes 0", _sets(eval_passes=0), "'eval_passes': must be >= 1"),
    (("cls",), "labels unknown", _sets(labels="json"), "'labels': must be one of"),
    (("det",), "train scale 7", _sets(train_scales="[7]"), "'train_scales': must be >= 32"),
    (("det",), "test scale 100000", _sets(test_scale=100000), "'test_scale': must be <= 4000"),
    (("det",), "rois not a multiple of images", _sets(rois_per_batch=33), "must be a multiple of images_per_batch"),
    (("det",), "fg_iou 2", _sets(fg_iou=2), "'fg_iou': must be <= 1"),
    (("det",), "fc_dim negative", _sets(fc_dim=-1), "'fc_dim': must be >= 1"),
    (("det",), "proposals folder missing", _sets(proposals="{missing}"), "not a folder"),
    (("seg",), "iter_size 0", _sets(iter_size=0), "'iter_size': must be >= 1"),
    (("seg",), "fc_dim negative", _sets(fc_dim=-1), "'fc_dim': must be >= 1"),
    (("seg",), "lr milestones decreasing", _sets(lr_milestones="[5,3]"), "lr_milestones must be increasing"),
    (("seg",), "SBD training without SBD", _sets(train_data="sbd"), "train_data=sbd needs"),
]
TABLE = [pytest.param(task, args, expect, id=f"{task}: {case}") for tasks, case, args, expect in CASES for task in tasks]


# the rows that also run as a real process: one per task, and a run folder that is a file
SUBPROCESS = ["cls: checkpoint not a checkpoint", "det: supervised weights missing", "seg: resume from a pretext checkpoint",
              "det: out_dir is a file"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("robust") / "pretext.pth"
    write_pretext_checkpoint(path)
    return path


def _case(task, extra, expect, ckpt, tmp_path) -> tuple[list[str], str, list[Path]]:
    """The command line of a case, the text its one line must contain and the paths that must not appear."""
    file = tmp_path / "a_file.txt"
    file.write_text("not a folder, not a checkpoint\n")
    fill = dict(out=tmp_path / "run", ckpt=ckpt, file=file, missing=tmp_path / "missing" / "nothing.pth")
    args = [a.format(**fill) for a in BASE[task] + _sets(out_dir="{out}") + extra]
    return args, expect.format(**fill), [tmp_path / "run", tmp_path / "missing"]


@pytest.fixture
def crosschannel_log():
    """The ``crosschannel`` logger's handlers as they were (a run in this process replaces them)."""
    from pretext.runtime import log

    handlers, level, propagate = log.handlers[:], log.level, log.propagate
    yield log
    for h in log.handlers:
        if h not in handlers:
            h.close()
    log.handlers, log.level, log.propagate = handlers, level, propagate


@pytest.mark.parametrize("task, extra, expect", TABLE)
def test_bad_setting_is_refused_in_one_line(task, extra, expect, ckpt, tmp_path, capfd, crosschannel_log):
    """The whole table in this process: what the console script does (``pretext.cli.main``), stderr read at file
    descriptor 2 and counted as :func:`refused_in_one_line` counts it."""
    from pretext import cli

    args, expect, must_not_exist = _case(task, extra, expect, ckpt, tmp_path)
    capfd.readouterr()
    t0 = time.time()
    rc = cli.main(args)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    shown = f"args={args}\nrc={rc}\nstderr:\n{err}"
    assert "Traceback" not in err, shown
    assert rc == 2, shown
    assert len(lines) == 1, shown
    assert lines[0].startswith("crosschannel transfer: error: ") and expect in lines[0], shown
    for p in must_not_exist:
        assert not p.exists(), f"{p} was created\n{shown}"
    assert time.time() - t0 < 60, f"refused only after {time.time() - t0:.0f} s"


@pytest.mark.parametrize("task, extra, expect", [p for p in TABLE if p.id in SUBPROCESS])
def test_bad_setting_is_refused_by_a_real_process(task, extra, expect, ckpt, tmp_path, refused_in_one_line):
    args, expect, must_not_exist = _case(task, extra, expect, ckpt, tmp_path)
    t0 = time.time()
    refused_in_one_line(args, expect=expect, must_not_exist=must_not_exist, timeout=120)
    assert time.time() - t0 < 60, f"refused only after {time.time() - t0:.0f} s"
