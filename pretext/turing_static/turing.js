// The participant's page of `crosschannel turing-test` (Zhang et al. 2016, Sec. 3.1): each pair is shown for
// display_ms, then hidden; the participant clicks the photo they believe has fake colours (no time limit).
// Practice pairs get feedback, test pairs none. Every answer is saved by the server before the next pair comes,
// and the session id lives in the URL (?session=) and in localStorage, so a reload continues where it was.
// body[data-state] is one of: loading intro fixation showing choose saving feedback break done error.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const KEY = "crosschannel-turing-session";
  const SECTIONS = ["intro", "trial", "break", "done", "error"];
  let current = null;   // the server's state of the session
  let pending = null;   // an answer not yet acknowledged: {trial, choice, rt_ms}
  let onset = 0;        // performance.now() when the current pair appeared
  let breakSeen = false;

  function setState(s) { document.body.dataset.state = s; }
  function show(section) { for (const id of SECTIONS) $(id).hidden = id !== section; }
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const frame = () => new Promise((r) => requestAnimationFrame(r));

  async function api(method, url, body) {
    const opts = { method, cache: "no-store", headers: {} };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(url, opts);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      const err = new Error((data && data.error) || "HTTP " + r.status);
      err.status = r.status;
      throw err;
    }
    return data;
  }

  function remember(sid) {
    try { localStorage.setItem(KEY, sid); } catch (e) { /* private mode: the URL still has it */ }
    const u = new URL(location.href);
    if (u.searchParams.get("session") !== sid || u.searchParams.has("new")) {
      u.searchParams.set("session", sid);
      u.searchParams.delete("new");
      history.replaceState(null, "", u);
    }
  }

  function forget() {
    try { localStorage.removeItem(KEY); } catch (e) { /* ignore */ }
    const u = new URL(location.href);
    u.searchParams.delete("session");
    history.replaceState(null, "", u);
  }

  function fail(text) {
    $("error-text").textContent = text;
    show("error");
    setState("error");
  }

  function loadImage(img, url) {
    return new Promise((resolve, reject) => {
      img.onload = () => (img.decode ? img.decode().catch(() => null) : Promise.resolve()).then(resolve);
      img.onerror = () => reject(new Error("could not load an image of this pair"));
      img.src = url;
    });
  }

  // ---- the session
  async function advance(st) {
    current = st;
    remember(st.session);
    document.documentElement.style.setProperty("--size", st.size + "px");
    if (st.done) {
      $("code").textContent = st.completion_code;
      show("done");
      setState("done");
      return;
    }
    const t = st.trial;
    if (t.phase === "test" && t.number === 1 && st.n_practice > 0 && !breakSeen) {
      $("break-n").textContent = String(st.n_test);
      show("break");
      setState("break");
      return;
    }
    await runTrial(t);
  }

  async function runTrial(t) {
    show("trial");
    setState("fixation");
    document.body.dataset.trial = String(t.index);
    document.body.dataset.phase = t.phase;
    $("status").textContent = (t.phase === "practice" ? "Practice pair " : "Pair ") + t.number + " of " + t.of;
    $("prompt").textContent = "";
    $("feedback").textContent = "";
    $("feedback").className = "feedback";
    $("continue").hidden = true;
    for (const side of ["left", "right"]) {
      $(side).disabled = true;
      $(side).classList.remove("picked", "was-fake");
    }
    try {
      await Promise.all([loadImage($("img-left"), t.left), loadImage($("img-right"), t.right),
                         sleep(current.gap_ms)]);
    } catch (e) {
      return recover(e);
    }
    await frame();
    setState("showing");
    onset = performance.now();
    while (performance.now() - onset < current.display_ms) await frame();
    setState("choose");
    $("prompt").textContent = "Click the photo with fake colours (or press \u2190 / \u2192).";
    for (const side of ["left", "right"]) $(side).disabled = false;
  }

  async function choose(side) {
    if (document.body.dataset.state !== "choose") return;
    const rt = Math.round(performance.now() - onset);
    setState("saving");
    for (const s of ["left", "right"]) $(s).disabled = true;
    $(side).classList.add("picked");
    pending = { trial: current.trial.index, choice: side, rt_ms: rt };
    await submit();
  }

  async function submit() {
    let res;
    try {
      res = await api("POST", "/api/sessions/" + current.session + "/answers", pending);
    } catch (e) {
      return recover(e);
    }
    pending = null;
    if (res.feedback) {
      const f = res.feedback;
      const good = f.correct;
      $("feedback").textContent = (good ? "Correct: " : "Wrong: ") + "the " + f.fake_side + " photo had fake colours.";
      $("feedback").className = "feedback " + (good ? "good" : "bad");
      $(f.fake_side).classList.add("was-fake");
      $("prompt").textContent = "";
      $("continue").hidden = false;
      $("continue").focus();
      setState("feedback");
      $("continue").onclick = () => { $("continue").onclick = null; advance(res.state); };
      return;
    }
    await advance(res.state);
  }

  // A lost connection or a server restart: answers already saved stay saved; find out where the session is and go
  // on from there (re-sending the pending answer if the server never got it).
  async function recover(err) {
    if (err.status === 404) {
      forget();
      return fail("This session is unknown to the server. Reload the page to start again.");
    }
    const conflict = err.status === 409;  // e.g. answered in another tab: just catch up
    if (!conflict) fail("Connection to the server lost (" + err.message + "). Your answers so far are saved. Retrying\u2026");
    for (let first = true; ; first = false) {
      if (!(first && conflict)) await sleep(2000);
      try {
        const st = await api("GET", "/api/sessions/" + current.session);
        if (pending && !st.done && st.next === pending.trial) return submit();
        pending = null;
        return advance(st);
      } catch (e) {
        if (e.status === 404) return recover(e);
      }
    }
  }

  async function start() {
    $("start").disabled = true;
    const pid = $("participant").value.trim();
    try {
      const st = await api("POST", "/api/sessions", pid ? { participant: pid } : {});
      await advance(st);
    } catch (e) {
      $("start").disabled = false;
      if (e.status === 400) {
        $("intro-counts").textContent = e.message;
        return;
      }
      fail("Could not start: " + e.message);
    }
  }

  async function init() {
    const params = new URLSearchParams(location.search);
    let sid = params.get("session");
    // A link with ?participant=ID (or ?new) is someone arriving, perhaps on a browser that served someone else: the
    // server resumes sessions by participant ID, so only the URL's own ?session= is trusted then, not localStorage.
    if (!sid && !params.has("participant") && !params.has("new")) {
      try { sid = localStorage.getItem(KEY); } catch (e) { /* ignore */ }
    }
    if (!sid && params.has("new")) forget();
    $("participant").value = params.get("participant") || "";
    $("start").onclick = start;
    $("begin-test").onclick = () => { breakSeen = true; runTrial(current.trial); };
    $("left").onclick = () => choose("left");
    $("right").onclick = () => choose("right");
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "ArrowLeft") choose("left");
      else if (ev.key === "ArrowRight") choose("right");
    });
    if (sid) {
      try {
        current = { session: sid };
        return await advance(await api("GET", "/api/sessions/" + encodeURIComponent(sid)));
      } catch (e) {
        if (e.status !== 404 && e.status !== 400) return recover(e);
        forget();
      }
    }
    show("intro");
    setState("intro");
    $("participant").focus();
  }

  init();
})();
