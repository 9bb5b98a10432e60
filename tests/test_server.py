"""`offspec serve` through the official `openai` client, on 127.0.0.1 with tiny random models: every answer equals
`generate`'s for the same prompt and options (alone or with others sharing its passes), the OpenAI error shapes,
disconnects, a bounded queue under load, failures that end one request, and a clean Ctrl-C."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")

from offspec.batch import BatchEngine  # noqa: E402
from offspec.chat import encode_prompt  # noqa: E402
from offspec.config import RuntimeConfig  # noqa: E402
from offspec.generate import GenerationConfig, generate  # noqa: E402
from offspec.scheduler import Scheduler  # noqa: E402
from offspec.server import ServeState, create_app, make_server  # noqa: E402

MODEL = "tiny"
RC = RuntimeConfig(device="cpu", dtype="float32", device_memory_over_min=0)  # every target layer streams


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An OFFSPEC_HOME for this module (stores converted once)."""
    old = os.environ.get("OFFSPEC_HOME")
    path = tmp_path_factory.mktemp("serve-home")
    os.environ["OFFSPEC_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("OFFSPEC_HOME", None)
    else:
        os.environ["OFFSPEC_HOME"] = old


@pytest.fixture(scope="module")
def models(make_tiny_model, home):
    return str(make_tiny_model("llama", num_layers=4)), str(make_tiny_model("llama", num_layers=2, seed=1))


def load(models, draft: str | None, sequences: int | None = 1):
    from offspec.loader import load_engine

    target, draft_dir = models
    d = {"draft": draft_dir, "ngram": "ngram", None: None}[draft]
    return load_engine(target, d, spec=draft is not None, rc=RC, cache_tokens=256, progress=False, budget_auto=False,
                       sequences=sequences)


class Running:
    """A server on a free port of 127.0.0.1, in a thread of this process."""

    def __init__(self, models, draft=None, parallel=4, queue=16, api_key=None, budget=12, slow_s=0.0):
        from offspec.cli.serve import _listen

        self.loaded = load(models, draft, parallel)
        engine = self.loaded.engine
        self.defaults = GenerationConfig(max_new_tokens=engine.context_tokens, spec=draft is not None, budget=budget)
        self.batch = BatchEngine(engine, self.loaded.sequences)
        target = engine.target
        self.acquired = []
        real_acquire = target.streamer.acquire
        target.streamer.acquire = lambda layer: (self.acquired.append(layer), real_acquire(layer))[1]
        self.rows: list[list[int]] = []
        real_forward = target.forward_batch

        def forward(*args):
            self.rows.append(list(args[4]))
            time.sleep(slow_s)  # a streamed pass takes a while: requests overlap as they would on a real model
            return real_forward(*args)

        target.forward_batch = forward
        self.records: list[dict] = []
        self.state = ServeState(Scheduler(self.batch, queue), self.loaded.tokenizer, MODEL, engine.context_tokens,
                                self.defaults, aliases=(models[0],), api_key=api_key, on_request=self.records.append)
        self.state.scheduler.start()
        sock = _listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = make_server(create_app(self.state), "127.0.0.1", self.port, self.state.scheduler.request_stop)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def client(self, key: str = "none", **kw):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.state.scheduler.stop()
        self.batch.close()
        self.loaded.close()


@pytest.fixture
def serve(models):
    started = []

    def start(**kw) -> Running:
        started.append(Running(models, **kw))
        return started[-1]

    yield start
    for r in started:
        r.close()


@pytest.fixture(scope="module")
def reference(models):
    """generate() alone, on engines of its own: (messages or prompt text, GenerationConfig, drafter) -> result."""
    engines = {}

    def run(prompt, cfg: GenerationConfig, draft=None, chat=True):
        if draft not in engines:
            engines[draft] = load(models, draft)
        loaded = engines[draft]
        tok = loaded.tokenizer
        ids = encode_prompt(tok, prompt) if chat else list(tok.encode(prompt))
        loaded.engine.reset()
        return ids, generate(loaded.engine, ids, cfg)

    yield run
    for loaded in engines.values():
        loaded.close()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def cfg_of(server: Running, **kw) -> GenerationConfig:
    return replace(server.defaults, **kw)


# ---------------------------------------------------------------------- answers
def test_chat_and_completions_equal_generate_streamed_or_not(serve, reference):
    s = serve()
    c = s.client()
    ids, want = reference(user("Hello there"), cfg_of(s, max_new_tokens=12))
    got = c.chat.completions.create(model=MODEL, messages=user("Hello there"), max_tokens=12)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == want.stats.finish == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(want.token_ids))
    assert got.usage.total_tokens == len(ids) + len(want.token_ids) and got.model == MODEL
    chunks = list(c.chat.completions.create(model=MODEL, messages=user("Hello there"), max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    ids, want = reference("def add(a, b):", cfg_of(s, max_new_tokens=10), chat=False)
    got = c.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=10)
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == len(ids)
    chunks = list(c.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=10, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    token_prompt = c.completions.create(model=MODEL, prompt=ids, max_tokens=10)  # token ids work as a prompt
    assert token_prompt.choices[0].text == want.text


def test_stop_strings_and_max_tokens(serve, reference):
    s = serve()
    c = s.client()
    _, full = reference(user("Tell me"), cfg_of(s, max_new_tokens=16))
    stop = full.text[5:7]
    _, want = reference(user("Tell me"), cfg_of(s, max_new_tokens=16, stop=(stop,)))
    got = c.chat.completions.create(model=MODEL, messages=user("Tell me"), max_tokens=16, stop=[stop])
    assert got.choices[0].message.content == want.text == full.text[: full.text.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(model=MODEL, messages=user("Tell me"), max_tokens=16, stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == want.text
    short = c.chat.completions.create(model=MODEL, messages=user("Tell me"), max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_equals_generate(serve, reference):
    s = serve(draft="draft")
    c = s.client()
    opts = dict(temperature=0.9, top_p=0.95, seed=7)
    _, want = reference(user("Once upon"), cfg_of(s, max_new_tokens=14, **opts), draft="draft")
    a, b = (c.chat.completions.create(model=MODEL, messages=user("Once upon"), max_tokens=14, **opts).choices[0]
            .message.content for _ in range(2))
    assert a == b == want.text
    others = {c.chat.completions.create(model=MODEL, messages=user("Once upon"), max_tokens=14, temperature=0.9,
                                        top_p=0.95, seed=seed).choices[0].message.content for seed in (8, 9, 10)}
    assert others - {a}  # another seed, another text


def test_logprobs_are_the_models_own(serve, reference):
    s = serve()
    c = s.client()
    _, want = reference(user("Hi"), cfg_of(s, max_new_tokens=6, logprobs=3))
    got = c.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=6, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == len(want.token_ids) == got.usage.completion_tokens
    for item, lp in zip(content, want.logprobs):
        assert item.logprob == pytest.approx(lp.logprob, abs=1e-5) and len(item.top_logprobs) == 3
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([v for _, v in lp.top], abs=1e-5)
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-6
    plain = c.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logprobs=2).choices[0].logprobs
    assert len(plain.tokens) == len(plain.token_logprobs) == len(plain.top_logprobs) == 4
    assert "".join(plain.tokens) == c.completions.create(model=MODEL, prompt="Hi", max_tokens=4).choices[0].text


# ---------------------------------------------------------------------- errors
def _error_shape(exc, status: int) -> dict:
    assert exc.status_code == status
    err = exc.body if "message" in exc.body else exc.body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_the_openai_error_shape(serve):
    s = serve(api_key="sesame")
    c = s.client("sesame")
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert _error_shape(e.value, 404)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=user("hi"), extra_body={"mirostat": 2})
    assert _error_shape(e.value, 400)["param"] == "mirostat"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=user("hi"), temperature=-1)
    assert _error_shape(e.value, 400)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=user("hi"), n=2)
    assert _error_shape(e.value, 400)["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=user("hi"),
                                  tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert _error_shape(e.value, 400)["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x" * 300)
    err = _error_shape(e.value, 400)
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    with pytest.raises(openai.AuthenticationError) as e:
        s.client("wrong").chat.completions.create(model=MODEL, messages=user("hi"))
    assert _error_shape(e.value, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        s.client("wrong").models.list()
    assert [m.id for m in c.models.list().data] == [MODEL]
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    conn.request("POST", "/v1/completions", body=b"{not json", headers={"Authorization": "Bearer sesame"})
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["code"] == "invalid_json"
    conn.request("GET", "/health")  # no key needed
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"


# ---------------------------------------------------------------------- sharing passes
@pytest.mark.parametrize("n", [2, 8])
def test_concurrent_requests_each_equal_generate_and_share_passes(serve, reference, n):
    s = serve(draft="draft", parallel=n, slow_s=0.01)
    prompts = [f"Question {i}: {'why ' * (i % 3)}?" for i in range(n)]
    opts = [dict(temperature=0.8, seed=40 + i) if i % 2 else {} for i in range(n)]  # greedy and seeded
    want = [reference(user(p), cfg_of(s, max_new_tokens=10, **o), draft="draft")[1] for p, o in zip(prompts, opts)]
    barrier = threading.Barrier(n)

    def ask(i):
        barrier.wait()
        return s.client().chat.completions.create(model=MODEL, messages=user(prompts[i]), max_tokens=10, **opts[i])

    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(ask, range(n)))
    assert [g.choices[0].message.content for g in got] == [w.text for w in want]
    streamed = s.loaded.engine.target.plan.layers("disk")
    passes = len(s.rows)
    assert len(s.acquired) == passes * len(streamed)  # one read of each layer per pass, whoever rides it
    assert passes < sum(w.stats.passes + 1 for w in want)  # fewer passes than the requests alone
    assert max(len(r) for r in s.rows) >= 2  # passes that carried several requests


def test_a_client_that_disconnects_leaves_the_next_pass_and_others_finish(serve, reference):
    s = serve(parallel=2, slow_s=0.02)
    _, want = reference(user("stay"), cfg_of(s, max_new_tokens=40))
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"model": MODEL, "messages": user("leave"), "stream": True, "max_tokens": 200}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    with ThreadPoolExecutor(1) as pool:
        stayed = pool.submit(lambda: s.client().chat.completions.create(model=MODEL, messages=user("stay"),
                                                                        max_tokens=40))
        while len(s.rows) < 5 or max(len(r) for r in s.rows) < 2:
            time.sleep(0.01)
        leaving_slot = 0
        conn.sock.shutdown(2)
        conn.close()
        cut = len(s.rows)
        answer = stayed.result(timeout=60)
    assert answer.choices[0].message.content == want.text
    later = s.rows[cut + 2:]  # the pass running at the disconnect (and the one after) may still carry it
    assert later and all(leaving_slot not in r for r in later)
    deadline = time.time() + 5
    while not any(r["status"] == "cancelled" for r in s.records) and time.time() < deadline:
        time.sleep(0.02)
    left = next(r for r in s.records if r["status"] == "cancelled")
    assert left["completion_tokens"] < 200


def test_load_none_lost_none_mixed_only_429_beyond_the_queue(serve, reference):
    s = serve(parallel=4, queue=4, slow_s=0.005)
    prompts = [f"client {c} request {r}" for c in range(16) for r in range(4)]
    want = {p: reference(user(p), cfg_of(s, max_new_tokens=6))[1].text for p in prompts}
    outcomes: dict[str, object] = {}

    def client(c: int) -> None:
        api = s.client()
        for r in range(4):
            p = f"client {c} request {r}"
            try:
                outcomes[p] = api.chat.completions.create(model=MODEL, messages=user(p), max_tokens=6)
            except openai.RateLimitError as exc:
                assert _error_shape(exc, 429)["type"] == "rate_limit_error"
                outcomes[p] = 429

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))
    assert set(outcomes) == set(prompts)  # none lost
    done = {p: o for p, o in outcomes.items() if o != 429}
    assert all(o.choices[0].message.content == want[p] for p, o in done.items())  # none mixed up
    assert len(done) >= 8 and len(done) < 64  # 16 clients, 4 slots and 4 places in the queue: some were turned away
    health = s.client()._client.get(f"http://127.0.0.1:{s.port}/health").json()
    assert health["slots_busy"] == health["queued"] == 0


def test_the_server_keeps_serving_after_a_request_fails(serve, reference):
    s = serve()
    c = s.client()
    target = s.loaded.engine.target
    real = target.forward_batch
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the disk went away")
        return real(*args)

    target.forward_batch = flaky
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model=MODEL, messages=user("first"), max_tokens=5)
    assert "disk went away" in _error_shape(e.value, 500)["message"]
    _, want = reference(user("second"), cfg_of(s, max_new_tokens=5))
    assert c.chat.completions.create(model=MODEL, messages=user("second"), max_tokens=5).choices[0].message.content \
        == want.text


# ---------------------------------------------------------------------- the command
def test_ctrl_c_cancels_what_runs_and_exits_cleanly(models, home, tmp_path):
    from offspec.cli.serve import _listen

    probe = _listen("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()
    env = dict(os.environ, OFFSPEC_HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "offspec", "serve", "-m", models[0], "--alias", MODEL, "--no-spec", "--dtype",
                             "float32", "--device-memory", "min", "--port", str(port), "--ctx-size", "512",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                             body=json.dumps({"model": MODEL, "prompt": "go", "stream": True, "max_tokens": 500}))
                resp = conn.getresponse()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
                time.sleep(0.2)
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGINT)
        rest = resp.read().decode()
        assert "shutting down" in rest and "[DONE]" not in rest  # the stream ends with an error event
        assert proc.wait(20) == 0
        err = proc.stderr.read().decode()
        assert "serving" in err and err.strip().endswith("stopped") and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
