"""``crosschannel transfer <task>``: one subcommand per transfer task, each also runnable as ``python -m <module>``.

Adding a task is one entry in :data:`TASKS` (its module has ``get_args_parser()`` and ``main(args)``); a task whose
module is not installed yet is left out of the listing.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# task -> (module with get_args_parser() and main(args), one-line help)
TASKS = {
    "cls": ("transfer.classification", "fine-tune on VOC classification (Zhang et al. Table 2, classification)"),
    "det": ("transfer.detection", "fine-tune a Fast R-CNN detector on VOC (Zhang et al. Table 2, detection)"),
    "det-eval": ("transfer.det_eval", "score VOC devkit detection results files (py-faster-rcnn voc_eval; COCO AP)"),
    "seg": ("transfer.segmentation", "FCN-32s on VOC segmentation (Zhang et al. Table 2, segmentation; --engine mmseg)"),
    "seg-eval": ("transfer.seg_eval", "score segmentation PNGs against VOC masks (mean IoU as FCN's score.py)"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {k: v for k, v in TASKS.items() if importlib.util.find_spec(v[0]) is not None}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("crosschannel transfer", description="Fine-tune a backbone on PASCAL VOC.")
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK", title="tasks")
    for name, (mod, text) in _available().items():
        parent = importlib.import_module(mod).get_args_parser()
        sub.add_parser(name, parents=[parent], add_help=False, help=text, description=parent.description)
    return p


def main(args) -> int:
    return importlib.import_module(TASKS[args.task][0]).main(args)


if __name__ == "__main__":
    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
