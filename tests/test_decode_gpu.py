"""The ``decode: gpu`` path, run on the CPU (torchvision's decode_jpeg decodes there too): workers send bytes and
the seeded crop, the training process decodes and resamples the same crops; the CPU fallback warns once."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pretext.data import CropSampler, TrainCrops, batch_to_device, list_images, resolve_decode
from pretext.decode import EncodedCrop, JpegBatch, collate_encoded, gpu_decode_unavailable, resize_box
from pretext.runtime import UserError

S = 96


@pytest.fixture(scope="module")
def photos(shared_data):
    return list_images(shared_data / "photos")[1::9][:12]


def test_resize_box_is_pils_resampling():
    """The device resampler computes PIL's antialiased bilinear coefficients for fractional boxes."""
    rng = np.random.default_rng(0)
    for k in range(40):
        H, W = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        a = np.asarray(Image.fromarray(a).resize((W, H), Image.BOX, reducing_gap=None))  # some smoothness
        x0, y0 = rng.uniform(0, W / 2), rng.uniform(0, H / 2)
        box = (x0, y0, rng.uniform(x0 + 1, W), rng.uniform(y0 + 1, H))
        size = int(rng.integers(8, 120))
        want = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR, box=box), np.float32)
        got = resize_box(torch.from_numpy(a.copy()).permute(2, 0, 1), box, size).permute(1, 2, 0).numpy()
        # PIL rounds to 8 bits between its two passes; one level apart at most
        assert np.abs(got.round() - want).max() <= 1, (box, size)


def _decode_gpu_style(ds, items, device="cpu"):
    batch = collate_encoded([ds[it] for it in items])
    return batch_to_device(*batch, device)


@pytest.mark.parametrize("mode", ["rrc", "resize_crop"])
def test_device_path_gives_the_cpu_paths_crops(photos, mode):
    cpu = TrainCrops(photos, S, mode, 0.25, draft=False)
    gpu = TrainCrops(photos, S, mode, 0.25, decode="gpu")
    items = [(i, 7 * i + 3) for i in range(len(photos))]
    first = gpu[items[0]][0]
    assert isinstance(first, EncodedCrop) and first.data == photos[0].read_bytes()
    rgb, ok, grey = _decode_gpu_style(gpu, items)
    want = torch.stack([cpu[it][0] for it in items]).float() / 255
    assert rgb.dtype == torch.float32 and rgb.shape == (len(photos), 3, S, S) and ok.all()
    assert (rgb - want).abs().max() <= 2 / 255 and (rgb - want).abs().mean() < 0.2 / 255
    assert torch.equal(grey, torch.tensor([cpu[it][2] for it in items]))


def test_device_path_mixed_batch(tmp_path, photos):
    """PNG (decoded in the worker), an EXIF-rotated JPEG, a grey JPEG and a JPEG whose data is broken after a
    valid header, in one batch."""
    img = Image.open(photos[2]).convert("RGB")
    img.save(tmp_path / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img.convert("L").save(tmp_path / "grey.jpg")
    data = photos[1].read_bytes()
    (tmp_path / "broken.jpg").write_bytes(data[: len(data) // 2])
    paths = [tmp_path / n for n in ("a.png", "rot.jpg", "grey.jpg", "broken.jpg")]
    gpu = TrainCrops(paths, S, "rrc", decode="gpu")
    cpu = TrainCrops(paths, S, "rrc", draft=False)
    items = [(i, 100 + i) for i in range(4)]
    assert isinstance(gpu[items[0]][0], torch.Tensor) and isinstance(gpu[items[1]][0], EncodedCrop)
    dl = torch.utils.data.DataLoader(gpu, batch_size=4, sampler=items, collate_fn=gpu.collate_fn)
    (jb, ok, grey), = list(dl)
    assert isinstance(jb, JpegBatch) and [k for k, *_ in jb.jpegs] == [1, 2, 3]
    with pytest.warns(UserWarning, match="broken.jpg"):
        rgb, ok, grey = batch_to_device(jb, ok, grey, "cpu")
    assert ok.tolist() == [True, True, True, False]
    assert grey.tolist() == [cpu[items[0]][2], cpu[items[1]][2], True, False]
    for k in range(3):
        want = cpu[items[k]][0].float() / 255
        assert (rgb[k] - want).abs().max() <= 2 / 255, k
    assert not rgb[3].any()
    # a batch with no JPEG left to the device (all decoded in the worker)
    rgb, ok, grey = batch_to_device(*collate_encoded([gpu[items[0]], gpu[items[0]]]), "cpu")
    assert ok.all() and torch.equal(rgb[0], rgb[1]) and (rgb[0] - cpu[items[0]][0].float() / 255).abs().max() == 0


def test_gpu_decode_falls_back_to_the_cpu_with_one_warning():
    with pytest.warns(UserWarning, match="decode: gpu needs a CUDA device") as rec:
        assert resolve_decode("gpu", torch.device("cpu")) == "cpu"
    assert len(rec) == 1
    if not torch.cuda.is_available():  # CUDA asked for where it is absent: the probe decode fails, one warning
        assert "cannot decode on cuda" in gpu_decode_unavailable(torch.device("cuda"))
        with pytest.warns(UserWarning, match="cannot decode on cuda") as rec:
            assert resolve_decode("gpu", torch.device("cuda")) == "cpu"
        assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_decode("cpu", torch.device("cpu")) == "cpu"
    with pytest.raises(UserError, match="decode must be 'cpu' or 'gpu'"):
        resolve_decode("nvjpeg", torch.device("cpu"))


def test_trainer_with_decode_gpu_on_a_cpu_machine_warns_once_and_trains(tmp_path, sample_dir):
    from pretext.train import PretextConfig, run

    data = sorted((sample_dir / "train").iterdir())[:4]
    cfg = PretextConfig(data=[str(p) for p in data], model="alexnet_cc", model_kwargs={"fc_dim": 16}, size=96,
                        loss="ce", batch_size=2, max_steps=1, workers=0, decode="gpu", out_dir=str(tmp_path / "run"),
                        tensorboard=False, progress=False, image_every=0)
    with pytest.warns(UserWarning) as rec:
        assert run(cfg) == 0
    assert len([w for w in rec if "decode: gpu" in str(w.message)]) == 1
    assert (tmp_path / "run" / "checkpoint.pth").exists()


def test_sampler_in_worker_and_device_agree_on_draws(photos):
    """The worker draws the crop once per sample from the seed: the encoded crop is the CPU path's crop."""
    gpu = TrainCrops(photos[:3], S, "rrc", decode="gpu")
    for i in range(3):
        e = gpu[(i, 42 + i)][0]
        torch.manual_seed(42 + i)
        with Image.open(photos[i]) as im:
            crop = CropSampler(S, "rrc")(*im.size)
        assert np.allclose(e.box, crop.box) and e.flip == crop.flip and e.clip and e.orientation == 1
