"""Load test of the chat service over real HTTP: streaming clients, time to first token, tokens/s, errors.

    python -m bench chat                                    # starts its own service (gunicorn) on a demo-size model
    python -m bench chat --url http://127.0.0.1:8000        # an already running service (e.g. after `make demo`)
    python -m bench chat --clients 1,8,32 --seconds 20 --reload-at 10   # admin reload in the middle of each level

Each client loops for the fixed time: open a conversation, send a real customer question (Bitext sample when present)
with ``stream: true``, read the Server-Sent Events to the end. Time to first token (TTFT) is measured at the first
``token`` event; tokens come from the stored reply's ``completion_tokens``. Any non-200 answer, ``error`` event or
broken stream counts as an error. Prints a Markdown table; `python -m bench chat` writes <--out>/chat.json, after
every level. A service started here is ``bench.chat_app`` (the real app plus ``/bench/decoder``): the JSON's
``decode_step`` says which decode path really served (static cache, compiled, CUDA graphs recorded, eager fallbacks),
so eager figures are never mistaken for the compiled GPU path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import REPO, bitext_path, table, write_json

OUT = REPO / "bench" / "out"


def questions(n: int = 200) -> list[str]:
    import csv

    from tasks.demo import datagen

    path = bitext_path()
    if path is not None:
        rows = list(csv.DictReader(path.open(encoding="utf-8")))
    else:
        rows = datagen.generate_rows(n, seed=3)
    return [r["instruction"] for r in rows[:n]]


def one_chat(session, url: str, question: str) -> dict:
    """One streamed reply: {'ok', 'ttft', 'seconds', 'tokens', 'conversation'}."""
    t0 = time.perf_counter()
    conv = session.post(f"{url}/api/conversations", json={}, timeout=30)
    if conv.status_code != 201:
        return {"ok": False, "error": f"create HTTP {conv.status_code}"}
    c = conv.json()
    t1 = time.perf_counter()
    r = session.post(f"{url}/api/conversations/{c['conversation_id']}/messages", stream=True, timeout=300,
                     json={"content": question, "stream": True}, headers={"X-Client-Token": c["client_token"]})
    if r.status_code != 200:
        return {"ok": False, "error": f"message HTTP {r.status_code}"}
    ttft, event, done = None, None, None
    for line in r.iter_lines(chunk_size=None, decode_unicode=True):  # chunk_size=None: as each event arrives
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            if event == "token" and ttft is None:
                ttft = time.perf_counter() - t1
            elif event == "done":
                done = json.loads(line[6:])["message"]
            elif event == "error":
                return {"ok": False, "error": line[6:200]}
    if done is None:
        return {"ok": False, "error": "stream ended without a done event"}
    # ttft None: the reply had no visible text (whitespace only), so there was no first token to see
    return {"ok": True, "ttft": ttft,
            "seconds": time.perf_counter() - t1, "tokens": done["completion_tokens"],
            "conversation": c["conversation_id"], "total": time.perf_counter() - t0}


def run_level(url: str, clients: int, seconds: float, qs: list[str], reload_at: float | None = None,
              admin_token: str | None = None) -> dict:
    import requests

    results: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        i = k
        while time.monotonic() < deadline:
            try:
                res = one_chat(session, url, qs[i % len(qs)])
            except Exception as exc:  # a dropped connection is an error to count, not a crash
                res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
            with lock:
                results.append(res)
            i += clients

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    reload_status = None
    if reload_at is not None:
        time.sleep(reload_at)
        reload_status = requests.post(f"{url}/admin/reload", json={}, timeout=30,
                                      headers={"Authorization": f"Bearer {admin_token}"}).status_code
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    ok = [r for r in results if r["ok"]]
    ttfts = sorted(r["ttft"] * 1000 for r in ok if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in ok)
    # decode rate of one stream after its first token; streams that ended right at their first token are left out
    stream_tps = [(r["tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in ok
                  if r["ttft"] is not None and r["tokens"] > 1 and r["seconds"] - r["ttft"] > 0.01]
    return {"clients": clients, "seconds": round(wall, 1), "replies": len(ok), "errors": len(results) - len(ok),
            "empty_replies": sum(r["ttft"] is None for r in ok),
            "ttft_p50_ms": _pct(ttfts, 50), "ttft_p95_ms": _pct(ttfts, 95),
            "aggregate_tokens_per_s": tokens / wall, "per_stream_tokens_per_s": statistics.median(stream_tps)
            if stream_tps else 0.0, "reload_http": reload_status,
            "versions": served_versions(url, [r["conversation"] for r in ok], admin_token),
            "error_samples": [r["error"] for r in results if not r["ok"]][:5]}


def served_versions(url: str, conversation_ids: list[str], admin_token: str | None) -> list[str]:
    """The model versions that served the level's replies (a reload may swap one in), from the admin API: the public
    one does not name them. Looked up after the level's clock stopped, so the lookups cost none of its figures."""
    import requests

    if not admin_token:
        return ["unknown (no admin token)"]
    session, versions = requests.Session(), set()
    for cid in dict.fromkeys(conversation_ids):
        r = session.get(f"{url}/admin/conversations/{cid}", headers={"Authorization": f"Bearer {admin_token}"},
                        timeout=30)
        versions.add(str(r.json()["model_version"]) if r.status_code == 200 else f"unknown (HTTP {r.status_code})")
    return sorted(versions)


def _pct(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


class LocalService:
    """The real service under gunicorn, on an embedded Postgres, serving a freshly built demo-size model."""

    def __init__(self, size: str = "demo", max_new_tokens: int = 64, device: str = "cpu", work: str | None = None,
                 static_cache: str = "auto", compile_step: str = "auto", pretrain_steps: int | None = None):
        self.size, self.max_new_tokens, self.device, self.work = size, max_new_tokens, device, work
        self.static_cache, self.compile, self.pretrain_steps = static_cache, compile_step, pretrain_steps
        self.tmp = tempfile.TemporaryDirectory(prefix="ecb-bench-chat-")
        self.proc = None

    def __enter__(self) -> str:
        try:
            return self._start()
        except BaseException:  # a failed start (or bench/gpu.sh's time limit) must not leave servers running
            self.__exit__()
            raise

    def _start(self) -> str:
        import subprocess

        import yaml

        os.environ.setdefault("ECB_STATE_DIR", str(REPO / ".ecb-bench"))
        from tasks.devstack import stack
        from tasks.io import db

        settings = stack.init_settings(airflow_port=stack.free_port())
        self.own_pg = not (stack.state_dir() / "postgres" / "postmaster.pid").exists()  # stopped again at exit
        stack.postgres_up(settings)
        env = {**os.environ, **stack.stack_env(settings)}
        os.environ["ECB_RESULTS_DB_URL"] = env["ECB_RESULTS_DB_URL"]
        db.migrate()
        if self.device == "cuda":  # TinyLlama-1.1B (cached) or its shape, random init: the GPU figures' model
            from bench.common import model_dir as device_model

            model_dir, self.model = device_model("cuda", Path(self.work or self.tmp.name))
        else:
            model_dir = Path(self.tmp.name) / f"bench-{self.size}"
            build_model(model_dir, self.size, self.pretrain_steps)
            self.model = f"{self.size}-size demo Llama, briefly pretrained"
        cfg_file = Path(self.tmp.name) / "chat.yaml"
        cfg_file.write_text(yaml.safe_dump({"chat": {
            "model_uri": str(model_dir), "max_new_tokens": self.max_new_tokens, "rate_limit_per_minute": 100000,
            "create_limit_per_minute": 100000, "max_batch_size": 32, "static_cache": self.static_cache,
            "compile": self.compile}, "pipeline": {"log_level": "WARNING"}}))
        port = stack.free_port()
        self.admin = env["ECB_CHAT_ADMIN_TOKEN"]
        env["ECB_CONFIG"] = str(cfg_file)  # the service's pool: chat.db_pool_size (8)
        from tasks.release.deploy import gunicorn_argv

        self.log = stack.state_dir() / "logs" / "bench-chat.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        argv = gunicorn_argv("127.0.0.1", port, 64)
        argv[argv.index("tasks.chat:create_app()")] = "bench.chat_app:create_app()"  # + GET /bench/decoder
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))  # noqa: SIM115
        url = f"http://127.0.0.1:{port}"
        # on a GPU /readyz turns 200 after the decode step is compiled and captured (chat.compile)
        stack.wait_for(lambda: stack.http_ok(f"{url}/readyz"), "chat service", 600, self.log)
        return url

    def __exit__(self, *exc) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None
        if getattr(self, "own_pg", False):
            from tasks.devstack import stack

            stack.postgres_down()
        self.tmp.cleanup()


def build_model(out: Path, size: str, steps: int | None = None) -> None:
    """A demo-architecture chat model (the same builder as `make demo`), briefly pretrained so replies are text."""
    from tasks.demo import datagen
    from tasks.demo import model as demo_model

    rows = datagen.generate_rows(600, seed=1)
    texts = [r["instruction"] for r in rows] + [r["response"] for r in rows]
    tokenizer = demo_model.build_tokenizer(texts, vocab_size=2048 if size != "tiny" else 512)
    model = demo_model.build_model(tokenizer, size=size)
    # threads=None: the count `python -m bench --threads` set for this process
    steps = steps if steps is not None else 150 if size == "tiny" else 120
    demo_model.pretrain(model, tokenizer, texts, steps=steps, threads=None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="A running service (default: start one on a demo-size model).")
    p.add_argument("--clients", default="1,8,32", help="Concurrency levels, comma separated.")
    p.add_argument("--seconds", type=float, default=15.0, help="Duration of each level.")
    p.add_argument("--reload-at", type=float, default=None, help="Admin reload this many seconds into each level.")
    p.add_argument("--size", default="demo", help="Model size when the bench starts its own service.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="Where the started service runs (cuda: TinyLlama-1.1B shape, static cache, compiled step).")
    p.add_argument("--work", default=None, help="Folder of built models, shared with the other suites.")
    p.add_argument("--static-cache", default="auto", choices=("auto", "on", "off"), help="chat.static_cache")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="chat.compile")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="Pretraining steps of the model a started service serves (default 150 tiny, 120 demo).")
    return p.parse_args(argv)


def decode_step(url: str) -> dict:
    """The service's own account of its decode path (bench.chat_app's /bench/decoder); a service started
    elsewhere (--url) has no such route."""
    import requests

    try:
        r = requests.get(f"{url}/bench/decoder", timeout=60)
    except requests.RequestException as exc:
        return {"unknown": f"{type(exc).__name__}: {exc}"[:200]}
    return r.json() if r.status_code == 200 else {"unknown": f"GET /bench/decoder: HTTP {r.status_code}"}


def main(args=None, save=None, budget=None) -> dict:
    from contextlib import nullcontext

    if not isinstance(args, argparse.Namespace) or not hasattr(args, "clients"):
        args = parse(args if isinstance(args, list) else [])
    qs = questions()
    service = (nullcontext(args.url) if args.url
               else LocalService(args.size, args.max_new_tokens, args.device, args.work, args.static_cache,
                                 args.compile, args.pretrain_steps))
    levels, result = [], {}
    if save:  # a time-out during the start-up (model load, decode-step compile) then still leaves a trace
        save({"levels": levels, "starting": "the service: model load, decode-step compile and capture"})
    with service as url:
        admin = os.environ.get("ECB_CHAT_ADMIN_TOKEN") if args.url else service.admin
        result = {"url": args.url or "local gunicorn", "levels": levels,
                  "model": getattr(service, "model", "the running service's"), "max_new_tokens": args.max_new_tokens,
                  "static_cache": args.static_cache, "compile": args.compile, "decode_step": decode_step(url)}
        for n in args.clients.split(","):
            if budget is not None and not budget.allows(args.seconds + 10):  # + the service's shutdown
                result.setdefault("skipped", []).append(budget.skipped(f"{n} clients", args.seconds + 10)["skipped"])
                continue
            levels.append(run_level(url, int(n), args.seconds, qs, args.reload_at, admin))
            result["decode_step"] = decode_step(url)  # after the replies: fallbacks happen while serving
            if save:
                save(result)
    print("\n### chat: streaming clients against the real HTTP service\n")
    print(table(_rows(levels)))
    for r in levels:
        if r["error_samples"]:
            print(f"errors at {r['clients']} clients: {r['error_samples']}")
    d = result["decode_step"]
    print(f"decode step: {d.get('path', d)}; eager fallbacks {d.get('eager_fallbacks')}, "
          f"CUDA graphs recorded {d.get('cuda_graphs_recorded', '-')}, as configured: {d.get('as_configured')}; "
          f"prefill: {d.get('prefill_requests')} requests in {d.get('prefill_passes')} passes")
    if args.device == "cuda" and not (d.get("graph_captured") and d.get("eager_fallbacks") == 0):
        print("!! the decode step did not run compiled with CUDA graphs: these are not the GPU path's figures")
    return result


def _rows(levels: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("versions", "error_samples")} for r in levels]


if __name__ == "__main__":
    write_json(OUT, "chat", main(sys.argv[1:]))
