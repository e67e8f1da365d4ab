"""Re-make docs/turing_test.png: the turing-test page in headless Chromium, showing a pair (Debian's chromium and
chromium-driver, and selenium; run from the repository root: ``python docs/turing_screenshot.py``).

The pair is a sample photo (pretext/sample/heldout, licences in pretext/sample/LICENSES.tsv) and the paper's "Random"
baseline of it (its lightness with another sample photo's colours), the kind of fake the sentinels use.
"""
from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from pretext.data import read_image
from pretext.turing import Experiment, make_server, random_colors, square
from pretext.turing_store import Protocol

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "pretext" / "sample" / "heldout"
PHOTO, DONOR = "enlightenment_Yellow-Flower", "gcompris_lemur"


def main(out: Path) -> None:
    tmp = Path(tempfile.mkdtemp())
    (tmp / "real").mkdir()
    (tmp / "fake").mkdir()
    for a, b in ((PHOTO, DONOR), (DONOR, PHOTO)):
        photo = read_image(SAMPLE / f"{a}.jpg")
        photo.save(tmp / "real" / f"{a}.jpg", quality=95)
        donor = read_image(SAMPLE / f"{b}.jpg").resize(photo.size, Image.BICUBIC)
        random_colors(photo, donor).save(tmp / "fake" / f"{a}.png")
    exp = Experiment(tmp / "real", [("random", tmp / "fake")], tmp / "db.sqlite", Protocol(display_ms=60_000), seed=0)
    for i in range(100):  # a session whose first pair is the flower, fake on the right
        sid, _ = exp.start(f"P-{i:04d}", None)
        t = exp.store.next_trial(sid)
        if t["image"] == PHOTO and t["fake_side"] == "right":
            break
    server = make_server(exp, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp / 'chromium'}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        drv.set_window_size(640, 613)
        drv.get(f"{server.url}?session={sid}")
        drv.execute_async_script("""const done = arguments[0];
            const t = setInterval(() => { if (document.body.dataset.state === 'showing') { clearInterval(t); done(); } }, 20);""")
        drv.save_screenshot(str(tmp / "page.png"))
    finally:
        drv.quit()
        server.shutdown()
        server.server_close()
    img = Image.open(tmp / "page.png").convert("RGB").crop((0, 0, 640, 380))
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(out, optimize=True)
    print(f"-> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "turing_test.png")
