"""The colorization Turing test (pretext.turing, pretext.turing_store, pretext.turing_report).

End to end in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium): a scripted participant
does a whole session, reloads half-way, and the report's numbers equal what it answered. The script knows which photo
is fake only from the pixels the browser shows, compared with the photos and the fakes on disk. Then the HTTP API's bad
inputs, a server killed mid-session, and the report's statistics on hand-made databases.
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretext.runtime import UserError, log
from pretext.turing import Experiment, index_folder, is_loopback, make_server, match_folders, warn_if_exposed
from pretext.turing_report import bootstrap_se, load, markdown, summarize
from pretext.turing_store import Protocol, Store, plan_session

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver (Debian; the README's test command does it) and pip install -e '.[test]'"


# --------------------------------------------------------------------------------------------- fixtures
def _colourful_photos(shared: Path, n: int) -> list[Path]:
    """The first ``n`` photos (sorted) whose mean HSV saturation is over 0.3, so a hue shift is plain to see."""
    out = []
    for p in sorted(q for q in (shared / "photos").rglob("*.jpg")):
        with Image.open(p) as im:
            im.draft("RGB", (160, 160))
            if np.asarray(im.convert("RGB").convert("HSV"))[..., 1].mean() > 0.3 * 255:
                out.append(p)
        if len(out) == n:
            return out
    raise AssertionError(f"fewer than {n} colourful photos in {shared / 'photos'}")


def _hue_shift(img: Image.Image, shift: int = 85) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    h = Image.fromarray(((np.asarray(h).astype(np.int16) + shift) % 256).astype(np.uint8))
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def make_folders(root: Path, photos: list[Path], shared: Path) -> tuple[Path, Path]:
    """real/<sub>/<name>.jpg (the photos, long side 320 px) and fake/<sub>/<name>.png (hue rotated by 120 degrees;
    every fifth one saved at 3/4 size, as a colorizer working at another resolution would)."""
    real, fake = root / "real", root / "fake"
    for i, p in enumerate(photos):
        rel = p.relative_to(shared / "photos")
        with Image.open(p) as im:
            im.draft("RGB", (320, 320))
            im = im.convert("RGB")
            im.thumbnail((320, 320), Image.BICUBIC)
        (real / rel.parent).mkdir(parents=True, exist_ok=True)
        (fake / rel.parent).mkdir(parents=True, exist_ok=True)
        im.save(real / rel, quality=95)
        f = _hue_shift(im)
        if i % 5 == 4:
            f = f.resize((im.width * 3 // 4, im.height * 3 // 4), Image.BICUBIC)
        f.save((fake / rel).with_suffix(".png"), compress_level=1)
    return real, fake


@pytest.fixture(scope="module")
def folders(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    return make_folders(tmp_path_factory.mktemp("turing"), _colourful_photos(shared_data, 50), shared_data)


@pytest.fixture(scope="module")
def small_folders(shared_data, tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("turing_small")
    real, fake = make_folders(root, _colourful_photos(shared_data, 6), shared_data)
    fake2 = root / "other"
    shutil.copytree(fake, fake2)
    return real, fake, fake2


class Running:
    """A turing-test server on a free loopback port, in a thread of this process."""

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.server = make_server(exp, "127.0.0.1", 0)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        """(status, parsed JSON or raw bytes) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        if r.getheader("Content-Type", "").startswith("application/json"):
            return r.status, json.loads(payload)
        return r.status, payload


@pytest.fixture()
def small_server(small_folders, tmp_path):
    real, fake, _ = small_folders
    exp = Experiment(real, [("hue", fake)], tmp_path / "t.sqlite", Protocol(n_practice=2, n_test=10, display_ms=50), seed=1)
    srv = Running(exp)
    yield srv
    srv.stop()


def raw_http(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server answers before it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and len(out) > out.index(b"\r\n\r\n") + 4:
                    break
        except socket.timeout:
            pass
    return out


def plan_rows(db: Path, sid: str) -> list[dict]:
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM trials WHERE session_id=? ORDER BY idx", (sid,))]


# --------------------------------------------------------------------------------------------- the browser
def _driver(tmp: Path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {INSTALL}")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the browser test needs Debian's headless Chromium; {INSTALL}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp}", "--window-size=760,640"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


# Wait (in the page, without polling over WebDriver) until body[data-state] is one of arguments[0]; return the state,
# the trial, and if the pair is up for choice, the 8x8 block means of both images as the browser decoded them (an
# exact box filter over every pixel).
WAIT_JS = """
const [wanted, done] = [arguments[0], arguments[arguments.length - 1]];
function blocks(img) {
  const n = 8, c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data, acc = new Array(n * n * 3).fill(0);
  for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
    const b = (Math.floor(y * n / c.height) * n + Math.floor(x * n / c.width)) * 3, i = (y * c.width + x) * 4;
    acc[b] += d[i]; acc[b + 1] += d[i + 1]; acc[b + 2] += d[i + 2];
  }
  return acc.map(v => v * n * n / (c.width * c.height));
}
function check() {
  const b = document.body, s = b.dataset.state;
  if (!wanted.includes(s) && s !== 'error') return false;
  obs.disconnect();
  done({state: s, trial: Number(b.dataset.trial), phase: b.dataset.phase, status: document.getElementById('status').textContent,
        error: document.getElementById('error-text').textContent,
        blocks: s === 'choose' ? [blocks(document.getElementById('img-left')), blocks(document.getElementById('img-right'))] : null});
  return true;
}
const obs = new MutationObserver(check);
if (!check()) obs.observe(document.body, {attributes: true, attributeFilter: ['data-state']});
"""


def _square(img: Image.Image, size: int = 256) -> np.ndarray:
    """What the test expects the page to show, computed here: the centre square, resized."""
    w, h = img.size
    s = min(w, h)
    sq = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
    return np.asarray(sq, dtype=np.float64)


def _blocks(img: Image.Image | np.ndarray, size: int = 256) -> np.ndarray:
    """8x8 block means of :func:`_square` (or of an array already size x size)."""
    a = _square(img, size) if isinstance(img, Image.Image) else img
    return a.reshape(8, size // 8, 8, size // 8, 3).mean(axis=(1, 3)).reshape(-1)


class Participant:
    """Scripted participant: identifies the fake from the pixels shown, then answers by a fixed rule (fooled on every
    third algorithm pair, never on sentinels; practice alternately right and wrong) and keeps its own tally."""

    def __init__(self, real: Path, fake: Path):
        reals, fakes = index_folder(real), index_folder(fake)
        self.real = {k: _blocks(Image.open(p).convert("RGB")) for k, p in reals.items()}
        self.fake = {}
        for k, p in fakes.items():
            like = Image.open(reals[k]).size
            self.fake[k] = _blocks(Image.open(p).convert("RGB").resize(like, Image.BICUBIC))
        self.log: list[dict] = []

    def identify(self, left: np.ndarray, right: np.ndarray) -> tuple[str, str, str]:
        """(photo name, fake side, 'algorithm' | 'sentinel') from the two images' block means."""
        def nearest(x, table):
            return min(((float(np.abs(x - v).mean()), k) for k, v in table.items()))
        (dl, kl), (dr, kr) = nearest(left, self.real), nearest(right, self.real)
        real_side, name = ("left", kl) if dl < dr else ("right", kr)
        assert min(dl, dr) < 3.0, f"neither image is one of the photos (distances {dl:.1f}, {dr:.1f})"
        other = right if real_side == "left" else left
        d_fake = float(np.abs(other - self.fake[name]).mean())
        d_real = float(np.abs(other - self.real[name]).mean())
        assert d_real > 6.0, f"both sides show photo {name} unchanged"
        kind = "algorithm" if d_fake < 3.0 else "sentinel"
        return name, "right" if real_side == "left" else "left", kind

    def decide(self, phase: str, kind: str, fake_side: str) -> str:
        real_side = "left" if fake_side == "right" else "right"
        if phase == "practice":
            right_answer = sum(e["phase"] == "practice" for e in self.log) % 2 == 0
        elif kind == "sentinel":
            right_answer = True
        else:
            right_answer = sum(e["phase"] == "test" and e["kind"] == "algorithm" for e in self.log) % 3 != 0
        return fake_side if right_answer else real_side


def _wait_state(drv, states: tuple[str, ...]) -> dict:
    got = drv.execute_async_script(WAIT_JS, list(states))
    assert got["state"] != "error", "page error: " + got["error"]
    return got


def test_missing_browser_fails_with_how_to_install(monkeypatch, tmp_path):
    """Without Chromium, chromedriver or selenium the browser test fails (never skips), saying how to install them."""
    import _pytest.outcomes

    monkeypatch.setattr(sys.modules[__name__], "CHROMEDRIVER", str(tmp_path / "no-chromedriver"))
    with pytest.raises(_pytest.outcomes.Failed, match="apt-get install -y chromium chromium-driver"):
        _driver(tmp_path)
    monkeypatch.setitem(sys.modules, "selenium", None)
    with pytest.raises(_pytest.outcomes.Failed, match="selenium is not installed"):
        _driver(tmp_path)


@pytest.mark.slow
def test_browser_session_report_equals_answers(folders, tmp_path):
    real, fake = folders
    db = tmp_path / "turing.sqlite"
    exp = Experiment(real, [("hue", fake)], db, Protocol(display_ms=60, gap_ms=0), seed=0)  # paper's 10 + 40, 10% sentinels
    srv = Running(exp)
    script = Participant(real, fake)
    drv = _driver(tmp_path / "chromium")
    drv.set_script_timeout(30)
    t_start = time.time()
    try:
        drv.get(f"http://127.0.0.1:{srv.port}/?participant=script-1")
        _wait_state(drv, ("intro",))
        assert drv.find_element("id", "participant").get_attribute("value") == "script-1"
        drv.find_element("id", "start").click()
        reloaded = False
        while True:
            page = _wait_state(drv, ("choose", "break", "done"))
            if page["state"] == "done":
                break
            if page["state"] == "break":
                assert all(e["phase"] == "practice" for e in script.log) and len(script.log) == 10
                drv.find_element("id", "begin-test").click()
                continue
            k, phase = page["trial"], page["phase"]
            if k == 25 and not reloaded:  # half-way through the test, the pair already shown: reload
                reloaded = True
                drv.refresh()
                again = _wait_state(drv, ("choose",))
                assert again["trial"] == 25 and again["status"] == page["status"] == "Pair 16 of 40"
                page = again
            assert k == len(script.log), "the page skipped or repeated a pair"
            left, right = (np.array(v) for v in page["blocks"])
            name, fake_side, kind = script.identify(left, right)
            choice = script.decide(phase, kind, fake_side)
            script.log.append({"idx": k, "phase": phase, "kind": kind, "image": name, "choice": choice,
                               "fooled": int(choice != fake_side)})
            drv.find_element("id", choice).click()
            if phase == "practice":
                _wait_state(drv, ("feedback",))
                text = drv.find_element("id", "feedback").text
                assert text.startswith("Wrong" if script.log[-1]["fooled"] else "Correct"), text
                assert f"the {fake_side} photo had fake colours" in text
                drv.find_element("id", "continue").click()
        code = drv.find_element("id", "code").text
        session_s = time.time() - t_start
        # the same browser: a plain reload of the page shows this participant's end; a link for someone else starts
        # at the intro; coming back with the same ID gives the same (finished) session, never a second one
        drv.get(f"http://127.0.0.1:{srv.port}/")
        assert _wait_state(drv, ("done",)) and drv.find_element("id", "code").text == code
        drv.get(f"http://127.0.0.1:{srv.port}/?participant=script-2")
        _wait_state(drv, ("intro",))
        drv.get(f"http://127.0.0.1:{srv.port}/?participant=script-1")
        _wait_state(drv, ("intro",))
        drv.find_element("id", "start").click()
        assert _wait_state(drv, ("done",)) and drv.find_element("id", "code").text == code
    finally:
        drv.quit()
        srv.stop()
    assert len(code) == 8 and reloaded
    # the session as the script saw it: the paper's protocol
    test = [e for e in script.log if e["phase"] == "test"]
    assert len(script.log) == 50 and len(test) == 40 and sum(e["kind"] == "sentinel" for e in test) == 4
    # the database holds exactly what was clicked
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT idx, choice, kind, image, rt_ms, views FROM trials ORDER BY idx").fetchall()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(e["idx"], e["choice"], e["kind"], e["image"]) for e in script.log]
    assert all(r[4] >= 60 for r in rows), "response times count from the onset of the pair"
    assert [r[0] for r in rows if r[5] != 1] == [25]  # only the reloaded pair was sent twice
    # the report equals the script's own tally
    from pretext.turing_report import get_args_parser, main

    out = tmp_path / "report"
    assert main(get_args_parser().parse_args([str(db), "-o", str(out)])) == 0
    r = json.loads((out / "report.json").read_text())
    alg = [e for e in test if e["kind"] == "algorithm"]
    fooled = sum(e["fooled"] for e in alg)
    a = r["algorithms"]["hue"]
    assert (a["test_pairs"], a["fooled"], a["kept"], a["sentinel_pairs"], a["sentinel_correct"]) == (36, fooled, 1, 4, 4)
    assert fooled == 12 and a["labeled_real"] == round(100 * 12 / 36, 2) and a["se"] == 0.0
    assert a["reshown_pairs"] == 1 and r["sentinel_accuracy"] == 100.0
    tally: dict[str, list[int]] = {}
    for e in alg:
        tally.setdefault(e["image"], [0, 0])
        tally[e["image"]][0] += e["fooled"]
        tally[e["image"]][1] += 1
    assert {d["image"]: [d["fooled"], d["shown"]] for d in a["images"]} == tally
    rates = [d["rate"] for d in a["images"]]
    assert rates == sorted(rates, reverse=True)
    assert "| hue | 33.3 ± 0.0 | 1 of 1 | 36 | 100.0 |" in (out / "report.md").read_text()
    for png in ("labeled_real.png", "fig6_hue.png"):
        with Image.open(out / png) as im:
            assert im.width > 200
    print(f"browser session of 50 pairs at 60 ms: {session_s:.1f} s")


# --------------------------------------------------------------------------------------------- HTTP, bad input
def _answer(srv, sid, k, choice="left", rt=500):
    return srv.request("POST", f"/api/sessions/{sid}/answers", {"trial": k, "choice": choice, "rt_ms": rt})


def test_bad_requests_get_clear_errors_and_never_touch_the_db(small_server):
    srv = small_server
    db = srv.exp.store.path
    status, st = srv.request("POST", "/api/sessions", {"participant": "p1"})
    assert status == 201 and st["next"] == 0 and st["trial"]["phase"] == "practice"
    sid = st["session"]
    assert _answer(srv, sid, 0, "left", 812)[0] == 200
    assert _answer(srv, sid, 1, "right", 640.4)[0] == 200
    good = {0: ("left", 812), 1: ("right", 640)}
    unknown = "A" * 24
    cases = [  # (method, path, body or raw bytes, expected status, words in the error)
        ("GET", f"/api/sessions/{unknown}", None, 404, "unknown session"),
        ("POST", f"/api/sessions/{unknown}/answers", {"trial": 2, "choice": "left", "rt_ms": 1}, 404, "unknown session"),
        ("GET", f"/api/sessions/{unknown}/trials/2/left", None, 404, "unknown session"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": 1, "choice": "left", "rt_ms": 1}, 409, "already answered"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": 0, "choice": "right", "rt_ms": 1}, 409, "already answered"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": 5, "choice": "left", "rt_ms": 1}, 409, "not reached yet"),
        ("POST", f"/api/sessions/{sid}/answers", b'{"trial": 2, "choice": "le', 400, "malformed JSON"),
        ("POST", f"/api/sessions/{sid}/answers", b"\xff\xfe", 400, "malformed JSON"),
        ("POST", f"/api/sessions/{sid}/answers", b"[2, \"left\"]", 400, "JSON object"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": "2", "choice": "left", "rt_ms": 1}, 400, "trial"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": 2.0, "choice": "left", "rt_ms": 1}, 400, "trial"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": 12, "choice": "left", "rt_ms": 1}, 400, "trial"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": -1, "choice": "left", "rt_ms": 1}, 400, "trial"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": 2, "choice": "both", "rt_ms": 1}, 400, "choice"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": 2, "choice": "left", "rt_ms": -5}, 400, "rt_ms"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": 2, "choice": "left", "rt_ms": True}, 400, "rt_ms"),
        ("POST", f"/api/sessions/{sid}/answers", b'{"trial": 2, "choice": "left", "rt_ms": NaN}', 400, "rt_ms"),
        ("POST", f"/api/sessions/{sid}/answers", {"trial": 2, "choice": "left"}, 400, "rt_ms"),
        ("POST", "/api/sessions", {"participant": "<script>"}, 400, "participant"),
        ("POST", "/api/sessions", {"participant": 7}, 400, "participant"),
        ("POST", "/api/sessions", {"participant": "x" * 65}, 400, "participant"),
        ("GET", f"/api/sessions/{sid}/trials/0/left", None, 403, "not this session's current pair"),
        ("GET", f"/api/sessions/{sid}/trials/3/left", None, 403, "not this session's current pair"),
        ("GET", f"/api/sessions/{sid}/trials/2/middle", None, 404, "not found"),
        ("GET", "/api/sessions", None, 405, "POST"),
        ("POST", "/", {}, 405, "GET"),
        ("PUT", f"/api/sessions/{sid}/answers", {"trial": 2, "choice": "left", "rt_ms": 1}, 405, "not allowed"),
        ("DELETE", f"/api/sessions/{sid}", None, 405, "not allowed"),
    ]
    # path traversal: nothing outside the page and the current pair is ever served
    for path in ("/static/../turing.py", "/static/..%2Fturing.py", "/static/%2e%2e/%2e%2e/pyproject.toml",
                 "/../../etc/passwd", "//etc/passwd", "/static/turing_static/index.html", "/turing_static/turing.js",
                 f"/api/sessions/{sid}/trials/2/../../../../../etc/passwd", f"/api/sessions/{sid}/trials/2/left/..",
                 "/static/", "/static/index.html?x=../../etc/passwd#", "/etc/passwd", "/pretext/turing.py"):
        cases.append(("GET", path, None, 404, "not found"))
    for method, path, body, want, words in cases:
        raw = body if isinstance(body, bytes) else None
        status, payload = srv.request(method, path, None if raw is not None else body, raw=raw)
        assert status == want, (method, path, body, status, payload)
        assert isinstance(payload, dict) and words in payload["error"], (method, path, payload)
    # the page itself, and the current pair, are served
    assert srv.request("GET", "/")[0] == 200 and srv.request("GET", "/static/turing.js")[0] == 200
    status, png = srv.request("GET", f"/api/sessions/{sid}/trials/2/left")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    # framing: oversized, missing or bad lengths are refused before the body is read, and the connection closed
    head = f"POST /api/sessions/{sid}/answers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    big = raw_http(srv.port, (head + "Content-Length: 10000000\r\n\r\n").encode() + b"{" * 5000)
    assert big.startswith(b"HTTP/1.1 413") and b"limit is 4096" in big and b"Connection: close" in big
    assert raw_http(srv.port, (head + "\r\n").encode()).startswith(b"HTTP/1.1 411")
    assert raw_http(srv.port, (head + "Content-Length: -3\r\n\r\n").encode()).startswith(b"HTTP/1.1 400")
    assert raw_http(srv.port, (head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode()).startswith(b"HTTP/1.1 411")
    garbage = raw_http(srv.port, b"GARBAGE\r\n\r\n")  # not HTTP: answered as HTTP/0.9 (no status line), JSON
    assert json.loads(garbage)["error"].startswith("Bad request syntax")
    long_url = raw_http(srv.port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
    assert long_url.startswith(b"HTTP/1.1 414")
    # the database: intact, holding exactly the two valid answers; the session goes on from trial 2
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1
        rows = c.execute("SELECT idx, choice, rt_ms FROM trials WHERE choice IS NOT NULL ORDER BY idx").fetchall()
    assert {k: (ch, rt) for k, ch, rt in rows} == good
    status, st = srv.request("GET", f"/api/sessions/{sid}")
    assert status == 200 and st["next"] == 2 and not st["done"]
    # a finished session takes no more answers
    for k in range(2, 12):
        assert _answer(srv, sid, k)[0] == 200
    status, err = _answer(srv, sid, 11)
    assert status == 409 and "complete" in err["error"]
    status, st = srv.request("GET", f"/api/sessions/{sid}")
    assert st["done"] and st["trial"] is None and len(st["completion_code"]) == 8


def test_session_protocol_and_resume_by_participant(small_server):
    srv = small_server
    status, st = srv.request("POST", "/api/sessions", {"participant": "alice"})
    assert status == 201
    sid = st["session"]
    rows = plan_rows(srv.exp.store.path, sid)
    assert [r["phase"] for r in rows] == ["practice"] * 2 + ["test"] * 10
    assert sum(r["kind"] == "sentinel" for r in rows) == 1 and all(r["phase"] == "test" for r in rows if r["kind"] == "sentinel")
    for k in range(3):
        status, res = _answer(srv, sid, k, rows[k]["fake_side"])
        assert status == 200
        # feedback on practice pairs only, and only after the answer
        assert res["feedback"] == ({"correct": True, "fake_side": rows[k]["fake_side"]} if k < 2 else None)
    # the same participant (another browser, a reload) continues the same session: one session per participant
    status, again = srv.request("POST", "/api/sessions", {"participant": "alice"})
    assert status == 200 and again["session"] == sid and again["next"] == 3 and again["trial"]["number"] == 2
    # anonymous participants get a session each
    a = srv.request("POST", "/api/sessions", {})[1]["session"]
    b = srv.request("POST", "/api/sessions", raw=b"")[1]["session"]
    assert len({sid, a, b}) == 3


def test_one_algorithm_per_session_balanced(small_folders, tmp_path):
    real, fake, fake2 = small_folders
    exp = Experiment(real, [("hue", fake), ("hue2", fake2)], tmp_path / "t.sqlite", Protocol(n_practice=1, n_test=4), seed=3)
    sids = [exp.start(f"p{i}", None)[0] for i in range(6)]
    algs = [exp.store.session(s)["algorithm"] for s in sids]
    assert sorted(algs) == ["hue"] * 3 + ["hue2"] * 3
    for s, a in zip(sids, algs):  # every fake of a session comes from its one algorithm's folder
        assert exp.store.session(s)["fake_dir"] == str((fake if a == "hue" else fake2).resolve())
    exp.store.close()


def test_concurrent_answers_to_one_trial_record_one(small_server):
    srv = small_server
    sid = srv.request("POST", "/api/sessions", {"participant": "racer"})[1]["session"]
    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(_answer(srv, sid, 0, c)[0]))
               for c in ["left", "right"] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [409] * 7
    assert sum(r["choice"] is not None for r in plan_rows(srv.exp.store.path, sid)) == 1


def test_images_served_are_the_photo_and_its_fake_cropped_alike(small_server):
    """The real side is the photo's centre square at 256 px, the fake side the fake resized to the photo first (so a
    fake made at another resolution lines up); a sentinel has the photo's lightness and another photo's colours."""
    from skimage.color import rgb2lab

    srv = small_server
    sid = srv.request("POST", "/api/sessions", {"participant": "pixels"})[1]["session"]
    rows = plan_rows(srv.exp.store.path, sid)
    reals, fakes = index_folder(srv.exp.dirs["real"]), index_folder(srv.exp.dirs["hue"])
    seen = set()
    for k, row in enumerate(rows):
        imgs = {}
        for side in ("left", "right"):
            status, png = srv.request("GET", f"/api/sessions/{sid}/trials/{k}/{side}")
            assert status == 200
            imgs[side] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
            assert imgs[side].shape == (256, 256, 3)
        real_side = "left" if row["fake_side"] == "right" else "right"
        photo = Image.open(reals[row["image"]]).convert("RGB")
        assert np.abs(_blocks(imgs[real_side]) - _blocks(photo)).mean() < 1.5
        if row["kind"] == "algorithm":
            fake_img = Image.open(fakes[row["image"]]).convert("RGB").resize(photo.size, Image.BICUBIC)
            assert np.abs(_blocks(imgs[row["fake_side"]]) - _blocks(fake_img)).mean() < 1.5
        else:  # the photo's lightness (up to gamut clipping) with the donor photo's colours
            assert row["donor"] != row["image"]
            lab_real, lab_fake = rgb2lab(imgs[real_side] / 255), rgb2lab(imgs[row["fake_side"]] / 255)
            lab_donor = rgb2lab(_square(Image.open(reals[row["donor"]]).convert("RGB")) / 255)
            assert np.abs(lab_fake[..., 0] - lab_real[..., 0]).mean() < 4.0
            ab_to_donor = np.abs(lab_fake[..., 1:] - lab_donor[..., 1:]).mean()
            assert ab_to_donor < 0.5 * np.abs(lab_fake[..., 1:] - lab_real[..., 1:]).mean() and ab_to_donor < 6.0
        seen.add(row["kind"])
        _answer(srv, sid, k)
    assert seen == {"algorithm", "sentinel"}


def test_photo_broken_after_start_is_a_clear_500(small_folders, tmp_path):
    real, fake, _ = small_folders
    mine = tmp_path / "real"
    shutil.copytree(real, mine)
    exp = Experiment(mine, [("hue", fake)], tmp_path / "t.sqlite", Protocol(n_practice=1, n_test=4), seed=0)
    srv = Running(exp)
    try:
        sid = srv.request("POST", "/api/sessions", {})[1]["session"]
        name = plan_rows(exp.store.path, sid)[0]["image"]
        broken = index_folder(mine)[name]
        broken.write_bytes(broken.read_bytes()[:300])  # truncated after the server checked it
        status, err = srv.request("GET", f"/api/sessions/{sid}/trials/0/left")
        assert status == 500 and "cannot be read" in err["error"]
        assert srv.request("GET", f"/api/sessions/{sid}")[0] == 200  # the server goes on
    finally:
        srv.stop()


def test_killed_server_loses_nothing_and_resumes(small_folders, tmp_path):
    real, fake, _ = small_folders
    db = tmp_path / "t.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pretext.turing", "--real", str(real), "--fake", f"hue={fake}", "--db", str(db),
           "--port", "0", "--practice", "2", "--test", "10", "--display-ms", "50", "--seed", "5"]

    def start():
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = ""
        while "serving on" not in line:
            line = p.stdout.readline()
            assert line or p.poll() is None, p.stderr.read()
        port = int(line.split("serving on http://127.0.0.1:")[1].split("/")[0])
        return p, port

    def call(port, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(method, path, body=json.dumps(body) if body is not None else None)
        r = conn.getresponse()
        out = (r.status, json.loads(r.read()))
        conn.close()
        return out

    p, port = start()
    try:
        sid = call(port, "POST", "/api/sessions", {"participant": "crash"})[1]["session"]
        answers = {k: (random.Random(k).choice(["left", "right"]), 300 + k) for k in range(7)}
        for k, (c, rt) in answers.items():
            assert call(port, "POST", f"/api/sessions/{sid}/answers", {"trial": k, "choice": c, "rt_ms": rt})[0] == 200
        plan = [(r["image"], r["fake_side"], r["kind"]) for r in plan_rows(db, sid)]
    finally:
        p.send_signal(signal.SIGKILL)  # no clean shutdown, no chance to flush anything
        p.wait(10)
        p.stdout.close()
        p.stderr.close()
    sessions, trials = load(db)
    got = {t["idx"]: (t["choice"], t["rt_ms"]) for t in trials if t["choice"] is not None}
    assert got == answers
    p, port = start()
    try:
        status, st = call(port, "GET", f"/api/sessions/{sid}")
        assert status == 200 and st["next"] == 7
        assert [(r["image"], r["fake_side"], r["kind"]) for r in plan_rows(db, sid)] == plan
        for k in range(7, 12):
            assert call(port, "POST", f"/api/sessions/{sid}/answers", {"trial": k, "choice": "left", "rt_ms": 1})[0] == 200
    finally:
        p.terminate()
        p.wait(10)
        p.stdout.close()
        p.stderr.close()
    sessions, trials = load(db)
    assert sessions[0]["finished_at"] is not None and all(t["choice"] for t in trials)
    # the report, as its own process (python -m), counts the answers given before and after the crash
    rc = subprocess.run([sys.executable, "-m", "pretext.turing_report", str(db), "-o", str(tmp_path / "rep"),
                         "--min-sentinel-accuracy", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr
    r = json.loads((tmp_path / "rep" / "report.json").read_text())["algorithms"]["hue"]
    alg = [t for t in trials if t["phase"] == "test" and t["kind"] == "algorithm"]
    assert (r["test_pairs"], r["fooled"]) == (len(alg), sum(t["choice"] != t["fake_side"] for t in alg))


# --------------------------------------------------------------------------------------------- folders, CLI, host
def test_unmatched_names_are_listed(small_folders, tmp_path, capsys):
    from pretext.cli import main as cli

    real, fake, _ = small_folders
    partial = tmp_path / "partial"
    shutil.copytree(fake, partial)
    dropped = sorted(partial.rglob("*.png"))[:2]
    for f in dropped:
        f.unlink()
    (partial / "extra.png").write_bytes((next(partial.rglob("*.png"))).read_bytes())
    with pytest.raises(UserError) as e:
        match_folders(real, [("p", partial)])
    msg = str(e.value)
    assert "2 without a match" in msg and "extra" in msg and all(f.stem in msg for f in dropped)
    names, _ = match_folders(real, [("p", partial)], allow_unmatched=True)
    assert len(names) == 4
    # colorizations of another aspect ratio (a colorizer that cropped, or squashed to 256 x 256) are flagged
    squares = tmp_path / "squares"
    for key, f in index_folder(fake).items():
        (squares / key).parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").resize((64, 64)).save((squares / key).with_suffix(".png"))
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:
        match_folders(real, [("sq", squares)])
        match_folders(real, [("hue", fake)])  # the same aspect ratio at 3/4 size: no warning
    finally:
        log.removeHandler(handler)
    assert len(seen) == 1 and "sq: 6 of 6 colorizations have another aspect ratio" in seen[0]
    # on the command line: one line, exit code 2, no traceback
    rc = cli(["turing-test", "--real", str(real), "--fake", str(partial), "--db", str(tmp_path / "x.sqlite")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "crosschannel turing-test: error:" in err and "extra" in err
    for argv, words in ([["--real", str(tmp_path / "nope"), "--fake", str(fake)], "no such folder"],
                        [["--real", str(real), "--fake", str(fake), "--fake", str(fake)], "--fake NAME=DIR"],
                        [["--real", str(real), "--fake", str(fake), "--practice", "-1"], "--practice"],
                        [["--real", str(real), "--fake", str(fake), "--db", str(REPO / "pyproject.toml")], "database"]):
        assert cli(["turing-test", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_loopback_by_default_and_one_warning_otherwise():
    from pretext.turing import get_args_parser

    assert get_args_parser().parse_args(["--real", "r", "--fake", "f"]).host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20") and not is_loopback("::")
    assert warn_if_exposed("127.0.0.1") is False
    assert warn_if_exposed("0.0.0.0") is True and warn_if_exposed("0.0.0.0") is False


def test_plan_follows_the_protocol():
    names = [f"img{i:02d}" for i in range(60)]
    for seed in range(20):
        trials = plan_session(names, Protocol(), random.Random(seed))
        practice = [t for t in trials if t.phase == "practice"]
        test = [t for t in trials if t.phase == "test"]
        assert [t.idx for t in trials] == list(range(50)) and trials[:10] == practice
        assert len(test) == 40 and sum(t.kind == "sentinel" for t in test) == 4 and all(t.kind == "algorithm" for t in practice)
        assert len({t.image for t in trials}) == 50  # enough photos: all different
        assert all(t.donor not in (None, t.image) for t in test if t.kind == "sentinel")
    sides = [t.fake_side for s in range(50) for t in plan_session(names, Protocol(), random.Random(s))]
    assert 0.45 < sides.count("left") / len(sides) < 0.55
    for seed in range(10):  # fewer photos than pairs: test photos stay distinct as long as there are enough
        few = plan_session(names[:25], Protocol(n_practice=10, n_test=20), random.Random(seed))
        assert len({t.image for t in few[10:]}) == 20 and len({t.image for t in few}) == 25
    assert Protocol(n_test=40, sentinel_fraction=0.1).n_sentinel == 4 and Protocol(n_test=5).n_sentinel == 1
    with pytest.raises(UserError):
        Protocol(n_test=2, sentinel_fraction=0.75).check()


# --------------------------------------------------------------------------------------------- the report
def test_bootstrap_se_matches_the_analytic_value():
    """Equal trials per participant: the pooled rate is the mean of the participants' rates, whose bootstrap standard
    error tends to their population standard deviation / sqrt(n)."""
    rng = np.random.default_rng(0)
    rates = rng.uniform(0.1, 0.6, size=40)
    shown = np.full(40, 36)
    fooled = np.round(rates * 36)
    want = np.std(fooled / 36) / np.sqrt(40)
    assert abs(bootstrap_se(fooled, shown, n_boot=40000, seed=1) - want) / want < 0.02
    assert bootstrap_se([5], [10]) == 0.0


def _fake_session(store: Store, pid: str, algorithm: str, answers: list[int] | None, sentinel_ok: list[bool], rng):
    """A session of 1 practice + 8 test pairs (2 sentinels) written through the Store, answered so that the
    algorithm pairs fool as ``answers`` says (1 = fooled) and the sentinels are right as ``sentinel_ok`` says."""
    proto = Protocol(n_practice=1, n_test=8, sentinel_fraction=0.25)
    trials = plan_session([f"im{i}" for i in range(12)], proto, rng)
    sid = store.create(pid, algorithm, "/nowhere/real", f"/nowhere/{algorithm}", proto, trials, None)
    it_a, it_s = iter(answers or []), iter(sentinel_ok)
    for t in trials:
        if t.phase == "practice":
            fooled = 1
        elif t.kind == "sentinel":
            fooled = 0 if next(it_s) else 1
        else:
            a = next(it_a, None)
            if a is None:
                return sid  # incomplete
            fooled = a
        other = "left" if t.fake_side == "right" else "right"
        store.answer(sid, t.idx, other if fooled else t.fake_side, 400)
    return sid


def test_report_numbers_by_hand(tmp_path, capsys):
    from pretext.turing_report import get_args_parser, main

    db = tmp_path / "hand.sqlite"
    store = Store(db)
    rng = random.Random(0)
    _fake_session(store, "ann", "zhang", [1, 0, 0, 1, 0, 0], [True, True], rng)     # 2/6, sentinels 2/2
    _fake_session(store, "bob", "zhang", [1, 1, 1, 0, 0, 0], [True, False], rng)    # 3/6, sentinels 1/2 -> left out
    _fake_session(store, "cyd", "zhang", [0, 0, 0, 0, 0, 1], [True, True], rng)     # 1/6
    _fake_session(store, "dan", "zhang", [1, 1], [True, True], rng)                 # incomplete
    _fake_session(store, "eve", "gray", [0, 0, 0, 0, 0, 0], [False, True], rng)     # left out
    store.close()
    sessions, trials = load(db)
    r = summarize(sessions, trials, min_sentinel_accuracy=0.75, n_boot=2000)
    z = r["algorithms"]["zhang"]
    assert (z["kept"], z["counted"], z["incomplete"], z["left_out"]) == (2, 3, 1, ["bob"])
    assert (z["test_pairs"], z["fooled"], z["labeled_real"]) == (12, 3, 25.0)
    # two participants at 2/6 and 1/6: the bootstrap distribution of the pooled rate is {1/6, 1/4, 1/3} with
    # probabilities 1/4, 1/2, 1/4, so its standard deviation is sqrt(1/2 * (1/12)^2) = 5.89%
    assert abs(z["se"] - 100 * np.sqrt(0.5) / 12) < 0.4
    assert (z["sentinel_pairs"], z["sentinel_correct"], z["sentinel_accuracy"]) == (6, 5, round(500 / 6, 2))
    g = r["algorithms"]["gray"]
    assert g["kept"] == 0 and g["labeled_real"] is None and g["left_out"] == ["eve"]
    assert r["sentinel_accuracy"] == 75.0
    assert r["algorithms"]["zhang"]["images"] and sum(d["shown"] for d in z["images"]) == 12
    md = markdown(r)
    assert "| zhang | 25.0 ±" in md and "| gray | n/a | 0 of 1 |" in md
    dan = next(p for p in r["participants"] if p["participant"] == "dan")
    assert not dan["complete"] and dan["answered"] == sum(t["choice"] is not None for t in trials if t["session_id"] == dan["session"])
    assert "bob (zhang, 1 of 2)" in md and "eve (gray, 1 of 2)" in md and f"dan ({dan['answered']} of 9 answered)" in md
    everyone = summarize(sessions, trials, min_sentinel_accuracy=0.0, include_incomplete=True)
    assert everyone["algorithms"]["zhang"]["fooled"] == 2 + 3 + 1 + 2 and everyone["algorithms"]["zhang"]["kept"] == 4
    # the command: Markdown on stdout, files written, thumbnails skipped when the folders are gone
    out = tmp_path / "rep"
    assert main(get_args_parser().parse_args([str(db), "-o", str(out)])) == 0
    assert "| zhang | 25.0 ±" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "labeled_real.png", "fig6_zhang.png"}


def test_report_bad_databases(tmp_path, capsys):
    from pretext.cli import main as cli

    not_db = tmp_path / "notes.sqlite"
    not_db.write_text("hello, not a database " * 100)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE x (a)")
    empty = tmp_path / "empty.sqlite"
    Store(empty).close()
    for path, words in ((tmp_path / "missing.sqlite", "no such database"), (not_db, "cannot open"),
                        (other, "not a crosschannel turing-test database"), (empty, "no sessions yet"),
                        (tmp_path, "a folder")):
        assert cli(["turing-report", str(path)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    with sqlite3.connect(other) as c:  # untouched
        assert c.execute("SELECT name FROM sqlite_master").fetchall() == [("x",)]


def test_cli_commands(capsys):
    """Both commands are in ``crosschannel``'s list; ``python -m`` of each runs in the crash and browser tests."""
    from pretext.cli import COMMANDS, main as cli

    assert COMMANDS["turing-test"][0] == "pretext.turing" and COMMANDS["turing-report"][0] == "pretext.turing_report"
    for name in ("turing-test", "turing-report"):
        with pytest.raises(SystemExit) as e:
            cli([name, "--help"])
        assert e.value.code == 0 and f"usage: crosschannel {name}" in capsys.readouterr().out


def test_page_is_package_data():
    from importlib import resources

    files = {p.name for p in (resources.files("pretext") / "turing_static").iterdir()}
    assert {"index.html", "turing.js", "turing.css"} <= files
    toml = (REPO / "pyproject.toml").read_text()
    assert '"turing_static/*"' in toml and "selenium" in toml


def test_ci_installs_the_browser():
    """The README's test command and .ci/run are the same line, and it installs chromium + chromium-driver."""
    ci = (REPO / ".ci" / "run").read_text()
    line = next(s for s in ci.splitlines() if "python -m pytest" in s and not s.startswith("#"))
    assert "chromium chromium-driver" in line and "command -v chromedriver" in line
    assert line in (REPO / "README.md").read_text()
