"""The colorization Turing test in the browser: ``crosschannel turing-test --real DIR --fake DIR [--fake DIR2 ...]``.

Zhang, Isola, Efros, "Colorful Image Colorization", ECCV 2016, Sec. 3.1 "Perceptual realism (AMT)" and Table 1
("AMT Labeled Real"): a real-vs-fake two-alternative forced choice. Each pair is a colour photo next to a recolorized
version of the same photo, in random order; the pair is shown for one second at 256x256, then the participant has
unlimited time to click the one they believe has fake colours. A session is 10 practice pairs with feedback (left out
of the analysis) then 40 test pairs without; one algorithm per session and at most one session per participant; 10%
of the test pairs are sentinels that pit the photo against the paper's "Random" baseline (its lightness with the
colours of another photo) to check attention. The paper's 40 participants per algorithm were Mechanical Turk workers;
here the page is served by a small local HTTP server (standard library only) and every answer is committed to SQLite
before the next pair is shown, so a crashed server or a closed tab loses nothing already answered, and a participant
who reloads continues where they were. ``crosschannel turing-report DB`` analyses the database
(:mod:`pretext.turing_report`).

Images are matched across the folders by their path relative to the folder, without the extension
(``colorize`` writes ``a/b.png`` for ``a/b.jpg``). Both images of a pair are prepared identically: the fake is resized
to the photo's size, both are centre-cropped to a square, resized to ``--size`` and sent as PNG, so neither format nor
crop can give the fake away. The server binds to 127.0.0.1 unless ``--host`` says otherwise (then it warns once),
serves only the two images of a session's current pair (no file paths in URLs) and refuses bodies over 4 KiB.

HTTP API (JSON): ``POST /api/sessions`` {participant?} -> session state; ``GET /api/sessions/<id>`` -> state;
``GET /api/sessions/<id>/trials/<k>/<left|right>`` -> PNG of the current pair; ``POST /api/sessions/<id>/answers``
{trial, choice, rt_ms} -> feedback (practice only) and the next state. Errors: 400 malformed, 403 image not of the
current pair, 404 unknown session or path, 405 method, 409 replayed / out-of-order answer or finished session,
411 no length, 413 body too large; always ``{"error": "..."}``.
"""
from __future__ import annotations

import argparse
import functools
import io
import ipaddress
import json
import math
import random
import re
import secrets
import socket
import sqlite3
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from .color import lab_to_rgb, rgb_to_lab
from .data import UnreadableImage, list_images, pil_to_tensor, read_image
from .runtime import UserError, log
from .turing_store import (
    DISPLAY_MS,
    GAP_MS,
    N_PRACTICE,
    N_TEST,
    SENTINEL_FRACTION,
    SIZE,
    Conflict,
    Protocol,
    Store,
    plan_session,
)

MAX_BODY = 4096  # bytes; every request body of the API is a few dozen
SID_RE = r"[A-Za-z0-9_-]{20,64}"
PARTICIPANT_RE = re.compile(r"[A-Za-z0-9_.@:+-]{1,64}")
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
                "/static/turing.js": ("turing.js", "text/javascript; charset=utf-8"),
                "/static/turing.css": ("turing.css", "text/css; charset=utf-8")}

_warned_hosts: set[str] = set()


# --------------------------------------------------------------------------------------------- images
def image_key(path: Path, root: Path) -> str:
    """The name an image is matched by: its path relative to the folder, POSIX separators, no extension."""
    return path.relative_to(root).with_suffix("").as_posix()


def index_folder(folder: str | Path) -> dict[str, Path]:
    """Map matching names to image files in ``folder`` (recursive); refuse two files that share a name."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    out: dict[str, Path] = {}
    clashes = []
    for p in list_images(root):
        key = image_key(p, root)
        if key in out:
            clashes.append(f"{out[key].name} / {p.name}")
        out[key] = p
    if clashes:
        raise UserError(f"{root}: images that differ only by extension cannot be matched: {_listing(clashes)}")
    if not out:
        raise UserError(f"{root}: no images found")
    return out


def _listing(items: list[str], n: int = 10) -> str:
    items = sorted(items)
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def parse_fake(spec: str) -> tuple[str, Path]:
    """``DIR`` (the algorithm is named after the folder) or ``NAME=DIR``."""
    m = re.fullmatch(r"([A-Za-z0-9_.+-]+)=(.+)", spec)
    if m and not Path(spec).is_dir():
        return m.group(1), Path(m.group(2))
    p = Path(spec)
    return (p.resolve().name or spec), p


def match_folders(real: str | Path, fakes: list[tuple[str, Path]], allow_unmatched: bool = False):
    """Index the folders and match them by name. Returns (names, {"real": map, algorithm: map, ...}).

    Every algorithm is tested on the same photos (the names present in every folder). Unmatched names are an error
    that lists them, unless ``allow_unmatched`` (then they are left out with a warning)."""
    if not fakes:
        raise UserError("give at least one --fake folder")
    names = [n for n, _ in fakes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two --fake folders are both named '{dup[0]}': name them with --fake NAME=DIR")
    if "real" in names:
        raise UserError("'real' is reserved for the photos: name that --fake folder with --fake NAME=DIR")
    maps = {"real": index_folder(real)}
    for name, folder in fakes:
        maps[name] = index_folder(folder)
    common = set.intersection(*(set(m) for m in maps.values()))
    problems = []
    for name, m in maps.items():
        missing = sorted(set(m) - common)
        if missing:
            where = real if name == "real" else dict(fakes)[name]
            problems.append(f"{where}: {len(missing)} without a match ({_listing(missing)})")
    if problems and not allow_unmatched:
        raise UserError("images are matched by file name (path without extension) across the folders; unmatched: "
                        + "; ".join(problems) + " (--allow-unmatched uses only the matched ones)")
    for p in problems:
        log.warning("left out: %s", p)
    if len(common) < 2:
        raise UserError(f"only {len(common)} image(s) match across the folders; the test needs at least 2")
    sizes = {name: {key: _header_size(m[key]) for key in common} for name, m in maps.items()}
    for name in maps:
        if name == "real":
            continue
        odd = [k for k in sorted(common) if not _same_aspect(sizes["real"][k], sizes[name][k])]
        if odd:
            (w, h), (fw, fh) = sizes["real"][odd[0]], sizes[name][odd[0]]
            log.warning("%s: %d of %d colorizations have another aspect ratio than their photo (e.g. %s: %dx%d vs "
                        "%dx%d); each fake is resized to its photo's size, which is right if the colorizer squashed the "
                        "photo and misaligned if it cropped it", name, len(odd), len(common), odd[0], w, h, fw, fh)
    return sorted(common), maps


def _header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            if im.width < 1 or im.height < 1:
                raise ValueError("empty image")
            return im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise UserError(f"{path}: not a readable image ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def _same_aspect(a: tuple[int, int], b: tuple[int, int], tol: float = 0.02) -> bool:
    """Same width/height ratio within ``tol`` (either orientation: EXIF rotation is applied only when decoding)."""
    r = a[0] / a[1]
    return any(abs(r / q - 1.0) <= tol for q in (b[0] / b[1], b[1] / b[0]))


def square(img: Image.Image, size: int, like: tuple[int, int] | None = None) -> Image.Image:
    """Resize to ``like`` (the photo's size) if given, centre-crop to a square, resize to ``size`` x ``size``."""
    if like is not None and img.size != like:
        img = img.resize(like, Image.BICUBIC)
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC, reducing_gap=3.0)


def random_colors(photo: Image.Image, donor: Image.Image) -> Image.Image:
    """The sentinel fake: the photo's lightness L with the ab colours of another photo (the paper's "Random"
    baseline, "copies the colors from a random image"); both are ``size`` x ``size`` already."""
    lab = rgb_to_lab(pil_to_tensor(photo))
    lab[1:] = rgb_to_lab(pil_to_tensor(donor))[1:]
    rgb = lab_to_rgb(lab).mul(255.0).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(rgb, "RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- the experiment
class Experiment:
    """Matched folders + protocol + database: what the HTTP handler serves."""

    def __init__(self, real: str | Path, fakes: list[tuple[str, Path]], db: str | Path, proto: Protocol,
                 allow_unmatched: bool = False, seed: int | None = None):
        self.proto = proto.check()
        self.names, self.maps = match_folders(real, fakes, allow_unmatched)
        self.dirs = {"real": str(Path(real).resolve()), **{n: str(Path(d).resolve()) for n, d in fakes}}
        self.algorithms = [n for n, _ in fakes]
        self.store = Store(db)
        self.rng = random.Random(seed)
        self.create_lock = threading.Lock()
        if len(self.names) < proto.n_test + proto.n_practice:
            log.warning("%d matched photos for %d pairs per session: photos repeat within a session (the paper's "
                        "pairs were all different photos)", len(self.names), proto.n_test + proto.n_practice)

    # ---- sessions
    def start(self, participant: str | None, user_agent: str | None) -> tuple[str, bool]:
        """Session of ``participant`` (resumed if it exists, since a participant does one session) or a new one, for
        the algorithm with the fewest sessions so far (ties at random). Returns (session id, created)."""
        with self.create_lock:
            if participant is not None:
                row = self.store.session_of(participant)
                if row is not None:
                    return row["id"], False
            counts = self.store.sessions_per_algorithm()
            least = min(counts.get(a, 0) for a in self.algorithms)
            algorithm = self.rng.choice([a for a in self.algorithms if counts.get(a, 0) == least])
            trials = plan_session(self.names, self.proto, self.rng)
            pid = participant or f"anon-{secrets.token_hex(6)}"
            sid = self.store.create(pid, algorithm, self.dirs["real"], self.dirs[algorithm], self.proto, trials,
                                    user_agent)
            log.info("session %s: participant %s, algorithm %s", sid[:8], pid, algorithm)
            return sid, True

    def state(self, sid: str, session: sqlite3.Row | None = None) -> dict:
        s = session if session is not None else self.store.session(sid)
        nxt = self.store.next_trial(sid)
        out = {"session": sid, "participant": s["participant"], "n_practice": s["n_practice"], "n_test": s["n_test"],
               "display_ms": s["display_ms"], "gap_ms": self.proto.gap_ms, "size": s["size"],
               "done": nxt is None, "next": s["n_practice"] + s["n_test"] if nxt is None else nxt["idx"], "trial": None}
        if nxt is None:
            out["completion_code"] = s["completion_code"]
        else:
            k = nxt["idx"]
            test = nxt["phase"] == "test"
            out["trial"] = {"index": k, "phase": nxt["phase"],
                            "number": k - s["n_practice"] + 1 if test else k + 1,
                            "of": s["n_test"] if test else s["n_practice"],
                            "left": f"/api/sessions/{sid}/trials/{k}/left",
                            "right": f"/api/sessions/{sid}/trials/{k}/right"}
        return out

    # ---- images
    def image(self, session: sqlite3.Row, trial: sqlite3.Row, side: str) -> bytes:
        algorithm = session["algorithm"]
        if algorithm not in self.maps:
            raise Conflict(f"this session tests '{algorithm}', which this server does not serve (restart it with that --fake)")
        if trial["image"] not in self.names or (trial["donor"] is not None and trial["donor"] not in self.names):
            raise Conflict(f"photo '{trial['image']}' of this session is not in the folders this server serves")
        source = "real" if side != trial["fake_side"] else "sentinel" if trial["kind"] == "sentinel" else algorithm
        try:
            return self._render(source, trial["image"], trial["donor"] if source == "sentinel" else None, session["size"])
        except UnreadableImage as e:
            log.error("cannot serve a pair of session %s: %s", session["id"][:8], e)
            raise HTTPError(500, "an image of this pair cannot be read (the server's log names it)") from None

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one Experiment per process; bounded
    def _render(self, source: str, name: str, donor: str | None, size: int) -> bytes:
        photo = read_image(self.maps["real"][name])
        if source == "real":
            return png_bytes(square(photo, size))
        if source == "sentinel":
            return png_bytes(random_colors(square(photo, size), square(read_image(self.maps["real"][donor]), size)))
        return png_bytes(square(read_image(self.maps[source][name]), size, like=photo.size))


# --------------------------------------------------------------------------------------------- HTTP
class HTTPError(Exception):
    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


def _static(name: str) -> bytes:
    return (resources.files("pretext") / "turing_static" / name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    server_version = "crosschannel-turing/1"
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a connection may stay idle

    @property
    def exp(self) -> Experiment:
        return self.server.experiment

    def log_message(self, fmt, *args):  # quiet by default; --verbose shows requests
        log.debug("%s %s", self.address_string(), fmt % args)

    # ---- responses
    def _send(self, status: int, body: bytes, ctype: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if ctype.startswith("text/html"):
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self'; frame-ancestors 'none'")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, close: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", close)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, URI too long, too many headers) as JSON too."""
        self.close_connection = True
        try:
            self._json(code, {"error": message or self.responses.get(code, ("error",))[0]}, close=True)
        except OSError:
            pass

    def _body(self) -> dict:
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(411, "send the body with a Content-Length (no chunked encoding)", close=True)
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(411, "Content-Length required", close=True)
        if not length.isdigit():
            raise HTTPError(400, f"bad Content-Length '{length[:20]}'", close=True)
        n = int(length)
        if n > MAX_BODY:
            raise HTTPError(413, f"request body of {n} bytes; the limit is {MAX_BODY}", close=True)
        raw = self.rfile.read(n)
        try:
            obj = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"malformed JSON ({e})") from None
        if not isinstance(obj, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return obj

    # ---- routing
    def do_GET(self):
        self._dispatch(self._get)

    def do_HEAD(self):
        self._dispatch(self._get)

    def do_POST(self):
        self._dispatch(self._post)

    def _not_allowed(self):
        self._dispatch(self._refuse)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _refuse(self, path: str) -> None:
        raise HTTPError(405, f"method {self.command} not allowed", close=True)

    def _dispatch(self, route) -> None:
        try:
            route(urlsplit(self.path).path)
        except HTTPError as e:
            self._json(e.status, {"error": e.message}, close=e.close)
        except Conflict as e:
            self._json(409, {"error": str(e)})
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("internal error on %s %s", self.command, self.path[:200])
            self._json(500, {"error": f"internal error ({type(e).__name__})"}, close=True)

    def _session(self, sid: str) -> sqlite3.Row:
        s = self.exp.store.session(sid)
        if s is None:
            raise HTTPError(404, "unknown session")
        return s

    def _get(self, path: str) -> None:
        if path in STATIC_FILES:
            name, ctype = STATIC_FILES[path]
            return self._send(200, _static(name), ctype)
        m = re.fullmatch(rf"/api/sessions/({SID_RE})", path)
        if m:
            s = self._session(m.group(1))
            return self._json(200, self.exp.state(m.group(1), s))
        m = re.fullmatch(rf"/api/sessions/({SID_RE})/trials/(\d{{1,6}})/(left|right)", path)
        if m:
            sid, k, side = m.group(1), int(m.group(2)), m.group(3)
            s = self._session(sid)
            nxt = self.exp.store.next_trial(sid)
            if nxt is None or nxt["idx"] != k:
                raise HTTPError(403, f"trial {k} is not this session's current pair")
            body = self.exp.image(s, nxt, side)
            if side == "left" and self.command == "GET":
                self.exp.store.mark_shown(sid, k)
            return self._send(200, body, "image/png")
        if re.fullmatch(rf"/api/sessions(/{SID_RE}/answers)?", path):
            raise HTTPError(405, "use POST")
        raise HTTPError(404, "not found")

    def _post(self, path: str) -> None:
        if path == "/api/sessions":
            body = self._body()
            pid = body.get("participant")
            if pid in (None, ""):
                pid = None
            elif not isinstance(pid, str) or not PARTICIPANT_RE.fullmatch(pid):
                raise HTTPError(400, "participant: 1-64 characters among letters, digits and _ . @ : + -")
            sid, created = self.exp.start(pid, self.headers.get("User-Agent"))
            return self._json(201 if created else 200, self.exp.state(sid))
        m = re.fullmatch(rf"/api/sessions/({SID_RE})/answers", path)
        if m:
            sid = m.group(1)
            body = self._body()
            s = self._session(sid)
            k, choice, rt = body.get("trial"), body.get("choice"), body.get("rt_ms")
            if type(k) is not int or not 0 <= k < s["n_practice"] + s["n_test"]:
                raise HTTPError(400, f"trial: an integer in 0..{s['n_practice'] + s['n_test'] - 1}")
            if choice not in ("left", "right"):
                raise HTTPError(400, "choice: 'left' or 'right'")
            if type(rt) not in (int, float) or not math.isfinite(rt) or not 0 <= rt <= 86_400_000:
                raise HTTPError(400, "rt_ms: a number of milliseconds in 0..86400000")
            t = self.exp.store.answer(sid, k, choice, int(round(rt)))
            feedback = None
            if t["phase"] == "practice":  # feedback on practice pairs only (Zhang et al. Sec. 3.1)
                feedback = {"correct": choice == t["fake_side"], "fake_side": t["fake_side"]}
            return self._json(200, {"feedback": feedback, "state": self.exp.state(sid)})
        if path in STATIC_FILES or re.fullmatch(rf"/api/sessions/{SID_RE}(/trials/\d+/(left|right))?", path):
            raise HTTPError(405, "use GET", close=True)  # the body is not read: close the connection
        raise HTTPError(404, "not found", close=True)


class TuringServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], experiment: Experiment):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Handler)
        self.experiment = experiment

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        self.experiment.store.close()


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback one (an unresolvable name counts as not)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def warn_if_exposed(host: str) -> bool:
    """Warn once per host that the page is reachable from other machines. Returns True if it warned."""
    if is_loopback(host) or host in _warned_hosts:
        return False
    _warned_hosts.add(host)
    log.warning("serving on %s: the test is reachable from other machines, without authentication; anyone who can "
                "reach it can start sessions and answer (use the default 127.0.0.1 and an SSH tunnel or a reverse "
                "proxy to share it)", host)
    return True


def make_server(experiment: Experiment, host: str = "127.0.0.1", port: int = 8000) -> TuringServer:
    warn_if_exposed(host)
    try:
        return TuringServer((host, port), experiment)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


# --------------------------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("crosschannel turing-test", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--real", required=True, help="folder of the real colour photos")
    p.add_argument("--fake", required=True, action="append", metavar="[NAME=]DIR",
                   help="folder of one algorithm's colorizations (repeat for more algorithms; one per session)")
    p.add_argument("--db", default="turing_test.sqlite", help="SQLite database of sessions and answers (resumed)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback warns")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--practice", type=int, default=N_PRACTICE, help="practice pairs with feedback")
    p.add_argument("--test", type=int, default=N_TEST, help="test pairs without feedback")
    p.add_argument("--sentinel-fraction", type=float, default=SENTINEL_FRACTION,
                   help="fraction of test pairs that are sentinels (photo vs its lightness with another photo's colours)")
    p.add_argument("--display-ms", type=int, default=DISPLAY_MS, help="how long each pair is shown")
    p.add_argument("--gap-ms", type=int, default=GAP_MS, help="blank between pairs")
    p.add_argument("--size", type=int, default=SIZE, help="images are shown size x size (centre crop)")
    p.add_argument("--seed", type=int, default=None, help="seed of the session plans (default: random)")
    p.add_argument("--allow-unmatched", action="store_true", help="use only the photos present in every folder")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(args) -> int:
    from .runtime import setup_logging

    setup_logging(verbose=args.verbose)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535 (got {args.port})")
    proto = Protocol(args.practice, args.test, args.sentinel_fraction, args.display_ms, args.gap_ms, args.size)
    exp = Experiment(args.real, [parse_fake(f) for f in args.fake], args.db, proto, args.allow_unmatched, args.seed)
    server = make_server(exp, args.host, args.port)
    print(f"turing-test: {len(exp.names)} photos, algorithms {', '.join(exp.algorithms)}; answers -> {args.db}")
    print(f"serving on {server.url}  (Ctrl-C stops; 'crosschannel turing-report {args.db}' analyses)", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("turing-test: stopped; every answer is in the database", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    from .runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))
