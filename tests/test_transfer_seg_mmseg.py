"""The mmsegmentation backend (the 'seg' extra, which CI installs): the mmcv-lite shim, the weights_only workaround,
``crosschannel export --format mmseg`` (``backbone.`` prefix, read by mmengine's own prefix loader), the encoder
registered as an mmseg backbone (tuple output, equal to the native network), and ``--engine mmseg`` end to end on
the SBD + VOC fixture (the same weights as the native engine after the same updates), with resume, and on
../shared/data/voc_sample. These tests fail, never skip, when the extra is missing."""
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from test_transfer_backbone import write_pretext_checkpoint
from test_transfer_seg import flags, run_cli, sbd_fixture, tiny, voc_fixture

from pretext.runtime import UserError, load_checkpoint, load_config
from transfer import fcn as FC
from transfer import segmentation as S

HAVE_MMSEG = all(importlib.util.find_spec(m) is not None for m in ("mmseg", "mmengine", "mmcv"))


@pytest.fixture(autouse=True)
def _needs_the_extra():
    if not HAVE_MMSEG:
        pytest.fail("mmsegmentation is not installed: the 'seg' extra is part of the test set-up "
                    "(pip install -e '.[test,seg]', as the README and .ci/run do)", pytrace=False)


@pytest.fixture(scope="module")
def mm():
    from transfer.mmseg_engine import require_mmseg

    require_mmseg()
    from transfer import mmseg_backbone

    return mmseg_backbone


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("mmsegdata")
    write_pretext_checkpoint(base / "c.pth")
    return dict(voc=voc_fixture(base, n=4), sbd=sbd_fixture(base, n=4), ckpt=base / "c.pth")


def test_mmcv_lite_shim_and_registrations(mm):
    from mmengine.utils.dl_utils import mmcv_full_available
    from mmseg.registry import DATA_SAMPLERS, HOOKS, METRICS, MODELS, TRANSFORMS

    assert not mmcv_full_available()  # mmcv-lite, answered without failing
    ext = sys.modules["mmcv._ext"]
    with pytest.raises(RuntimeError, match="mmcv op 'nms' needs mmcv's compiled extension"):
        ext.nms()
    assert MODELS.get("CrossChannelEncoder") is mm.CrossChannelEncoder and MODELS.get("FCNCropHead") is mm.FCNCropHead
    assert TRANSFORMS.get("LoadSegMask") and TRANSFORMS.get("LoadCrossChannelImage")
    assert DATA_SAMPLERS.get("DrawSampler") and METRICS.get("SegConfusionMetric") and HOOKS.get("StopOnSignalHook")


@pytest.mark.parametrize("model_name, input_mode", [("alexnet_cc", "gray"), ("zhang_vgg", "color"),
                                                     ("timm:resnet18", "gray")])
def test_export_is_read_by_mmengine_and_the_encoder_equals_the_native_net(mm, tmp_path, model_name, input_mode):
    from mmengine.runner.checkpoint import _load_checkpoint_with_prefix
    from mmseg.registry import MODELS

    write_pretext_checkpoint(tmp_path / "c.pth", model_name)
    out = tmp_path / "backbone_mmseg.pth"
    from pretext.cli import main as crosschannel

    assert crosschannel(["export", "--format", "mmseg", "--checkpoint", str(tmp_path / "c.pth"), "--input", input_mode,
                         "-o", str(out)]) == 0
    raw = torch.load(out, weights_only=True)  # plain tensors and containers: torch's default loader reads it
    assert raw["state_dict"] and all(k.startswith("backbone.") for k in raw["state_dict"])
    native = FC.fcn_backbone(str(tmp_path / "c.pth"), input=input_mode, rescale=False).eval()
    stripped = _load_checkpoint_with_prefix("backbone.", str(out))  # mmengine's Pretrained(prefix=...) path
    assert set(stripped) == set(native.state_dict())
    assert all(torch.equal(stripped[k], v) for k, v in native.state_dict().items())
    spec = raw["meta"]["crosschannel"]["spec"]
    enc = MODELS.build(dict(type="CrossChannelEncoder", spec=spec, checkpoint=str(out)))
    enc.init_weights()
    enc.eval()
    rgb = torch.rand(1, 3, 61, 47)
    with torch.no_grad():
        feats = enc(rgb)
        assert isinstance(feats, tuple) and len(feats) == 1
        torch.testing.assert_close(feats[0], native(native.prepare(rgb)))
    assert set(enc.state_dict()) == set(native.state_dict())  # the TransferNet's keys, under backbone. in mmseg


def test_export_key_mismatch_names_the_file(mm, tmp_path):
    from mmseg.registry import MODELS

    write_pretext_checkpoint(tmp_path / "c.pth")
    out = tmp_path / "e.pth"
    run_cli("transfer.export", ["--format", "mmseg", "--checkpoint", str(tmp_path / "c.pth"), "-o", str(out)])
    raw = torch.load(out, weights_only=True)
    del raw["state_dict"]["backbone.fc7.0.bias"]
    torch.save(raw, tmp_path / "broken.pth")
    enc = MODELS.build(dict(type="CrossChannelEncoder", spec=raw["meta"]["crosschannel"]["spec"],
                            checkpoint=str(tmp_path / "broken.pth")))
    with pytest.raises(UserError, match=r"broken.pth: the exported weights do not fit the network: missing \['fc7.0.bias'\]"):
        enc.init_weights()


def test_own_checkpoint_scheme_refuses_foreign_files(mm, tmp_path):
    from transfer.mmseg_engine import RUN_SCHEME, load_own_checkpoint

    torch.save({"x": 1}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a checkpoint of this run's work folder"):
        load_own_checkpoint(RUN_SCHEME + str(tmp_path / "other.pth"))


def _mm_state_as_native(path) -> dict:
    sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    out = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    out.update({"score.weight": sd["decode_head.conv_seg.weight"], "score.bias": sd["decode_head.conv_seg.bias"],
                "upscore.weight": sd["decode_head.upscore.weight"]})
    return out


@pytest.mark.slow
def test_mmseg_engine_equals_the_native_engine_and_resumes(mm, data, tmp_path):
    """Same images (DrawSampler), same protocol, dropout off: after 2 updates of 2 images the two engines hold the
    same weights and score the same confusion matrix. Then --resume continues mmengine's checkpoint (loaded through
    the crosschannel-run:// scheme; torch's weights_only default cannot read it)."""
    common = ["--sbd", str(data["sbd"]), "--voc", str(data["voc"]), "--checkpoint", str(data["ckpt"])]
    sets = dict(dropout=0.0, max_iter=2, lr=0.01)
    assert run_cli("transfer.segmentation", common + flags(tiny(tmp_path / "native", **sets))) == 0
    assert run_cli("transfer.segmentation", common + ["--engine", "mmseg"] + flags(tiny(tmp_path / "mm", **sets))) == 0
    run = tmp_path / "mm" / "colorization"
    r_mm = json.loads((run / "results.json").read_text())
    r_nat = json.loads((tmp_path / "native" / "colorization" / "results.json").read_text())
    assert r_mm["engine"] == "mmseg" and r_mm["images"] == 4 and r_mm["upsampling"]["offset"] == 18
    assert (run / "predictions.png").is_file() and len(list((run / "predictions").glob("*.png"))) == 4
    last = (run / "mmseg" / "last_checkpoint").read_text().strip()
    assert last.endswith("iter_4.pth")  # mmengine counts images: 2 updates x 2 images
    native = load_checkpoint(tmp_path / "native" / "colorization" / "checkpoint.pth")["model"]
    mmw = _mm_state_as_native(last)
    assert set(mmw) == set(native)
    init = {k[len("backbone."):]: v for k, v in torch.load(run / "backbone_mmseg.pth", weights_only=True)
            ["state_dict"].items()}
    moved = max(float((native[k] - init[k[len("backbone."):]]).abs().max()) for k in native if k.startswith("backbone."))
    apart = max(float((mmw[k] - native[k]).abs().max()) for k in native)
    assert moved > 1e-6 and apart <= 0.01 * moved, (moved, apart)  # the same updates (bit-identical here)
    assert native["score.weight"].abs().sum() > 0 and torch.equal(mmw["upscore.weight"], native["upscore.weight"])
    assert r_mm["hist"] == r_nat["hist"]
    # mmengine's checkpoint needs weights_only=False (the problem the run:// scheme solves) ...
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        torch.load(last, weights_only=True)
    # ... and --resume with more updates continues it (a finished row is kept unless its results are removed)
    (run / "results.json").unlink()
    assert run_cli("transfer.segmentation", common + ["--engine", "mmseg", "--resume"] +
                   flags(tiny(tmp_path / "mm", **dict(sets, max_iter=3)))) == 0
    assert (run / "mmseg" / "last_checkpoint").read_text().strip().endswith("iter_6.pth")
    logs = sorted((run / "mmseg").glob("*/*.log"))
    assert len(logs) == 2 and "Advance dataloader 4 steps" in logs[-1].read_text()  # resumed at image 4, not anew
    with pytest.raises(UserError, match=r"last_checkpoint exists: pass --resume"):
        S.run(load_config(S.SegConfig, None, ["sbd=" + str(data["sbd"]), "voc=" + str(data["voc"]), "engine=mmseg",
                                              "checkpoint=" + str(data["ckpt"]), *tiny(tmp_path / "mm", **sets)]))


@pytest.mark.slow
def test_mmseg_engine_on_voc_sample(mm, shared_data, tmp_path):
    voc = shared_data / "voc_sample" / "semantic_segmentation"
    write_pretext_checkpoint(tmp_path / "c.pth")
    rc = run_cli("transfer.segmentation", ["--engine", "mmseg", "--voc", str(voc), "--checkpoint",
                                           str(tmp_path / "c.pth")] +
                 flags(tiny(tmp_path / "run", train_data="voc", train_split="all", val_split="all", max_iter=1)))
    assert rc == 0
    r = json.loads((tmp_path / "run" / "colorization" / "results.json").read_text())
    assert r["images"] == 3 and r["engine"] == "mmseg" and 0 <= r["mIoU"] <= 1
    hist = np.array(r["hist"])
    assert hist.sum() == r["pixels"] > 0.8 * 3 * 500 * 340


def test_export_of_a_fine_tuned_fcn_predicts_as_the_native_fcn(mm, data, tmp_path):
    """A `transfer seg` checkpoint exported whole (backbone. + decode_head.) into the shipped config's model gives
    the native FCN's logits."""
    from mmengine.config import Config
    from mmseg.registry import MODELS

    from transfer.mmseg_engine import config_path

    assert run_cli("transfer.segmentation", ["--sbd", str(data["sbd"]), "--voc", str(data["voc"]), "--checkpoint",
                                             str(data["ckpt"])] + flags(tiny(tmp_path / "run", max_iter=1, lr=0.1))) == 0
    ck = tmp_path / "run" / "colorization" / "checkpoint.pth"
    out = tmp_path / "fcn_mmseg.pth"
    assert run_cli("transfer.export", ["--format", "mmseg", "--checkpoint", str(ck), "-o", str(out)]) == 0
    raw = torch.load(out, weights_only=True)
    mc = Config.fromfile(str(config_path()))
    mc.model.backbone.update(spec=raw["meta"]["crosschannel"]["spec"], checkpoint=None)
    width = raw["meta"]["crosschannel"]["spec"]["num_features"]
    mc.model.decode_head.update(in_channels=width, channels=width)
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")
    model = MODELS.build(mc.model)
    missing, unexpected = model.load_state_dict(raw["state_dict"], strict=False)
    assert not unexpected and all(k.startswith("data_preprocessor") for k in missing)
    model.eval()
    fcn = S.build_model(load_config_for(tmp_path, data), "colorization", None, resume=True)
    fcn.load_state_dict(load_checkpoint(ck)["model"])
    fcn.eval()
    rgb = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        native = fcn(fcn.backbone.prepare(rgb))
        meta = [dict(img_shape=(40, 48), ori_shape=(40, 48))]
        ours = model.decode_head.predict(model.backbone(rgb), meta, None)
    torch.testing.assert_close(ours, native, rtol=1e-5, atol=1e-5)
    assert native.abs().sum() > 0


def load_config_for(tmp_path, data):
    from pretext.runtime import load_config

    return load_config(S.SegConfig, None, ["sbd=" + str(data["sbd"]), "voc=" + str(data["voc"]),
                                           "checkpoint=" + str(data["ckpt"]), *tiny(tmp_path / "x")])


@pytest.mark.slow
def test_mmseg_engine_stops_on_a_signal_after_a_whole_update(mm, data, tmp_path, monkeypatch):
    """A stop signal (here: already received) ends mmengine's loop at the first update boundary with a checkpoint
    and exit code 143; --resume finishes the run."""
    import signal

    from pretext.runtime import GracefulStop

    class Signalled(GracefulStop):
        def __enter__(self):
            super().__enter__()
            self.signum = signal.SIGTERM
            return self

    monkeypatch.setattr(S, "GracefulStop", Signalled)
    common = ["--sbd", str(data["sbd"]), "--voc", str(data["voc"]), "--checkpoint", str(data["ckpt"]),
              "--engine", "mmseg"]
    out = tmp_path / "run"
    assert run_cli("transfer.segmentation", common + flags(tiny(out, max_iter=3))) == 143
    work = out / "colorization" / "mmseg"
    assert (work / "last_checkpoint").read_text().strip().endswith("iter_2.pth")  # one whole update of 2 images
    assert not (out / "colorization" / "results.json").exists()
    monkeypatch.setattr(S, "GracefulStop", GracefulStop)
    assert run_cli("transfer.segmentation", common + ["--resume"] + flags(tiny(out, max_iter=3))) == 0
    assert (work / "last_checkpoint").read_text().strip().endswith("iter_6.pth")
    assert json.loads((out / "colorization" / "results.json").read_text())["engine"] == "mmseg"
