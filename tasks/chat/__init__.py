"""The chat service: a Flask app factory serving the registry's champion model, and its canary beside it.

    flask --app 'tasks.chat:create_app()' run --port 8000                       # development
    gunicorn --worker-class gthread --workers 1 --threads 64 -b 127.0.0.1:8000 'tasks.chat:create_app()'

One process per device: generation runs on a single worker thread (``engine.Generator``) that batches every open
request, while gunicorn's threads only stream. The model is loaded by the factory (in the background by default, so
``/healthz`` answers at once and ``/readyz`` turns 200 when the model is in), never at import.

What is served comes from the registry's aliases, read at start and on every ``/admin/reload``: ``champion``, and
``candidate`` (a canary) when that version carries a canary share (tag ``ecb.canary_share``). A new conversation goes
to the candidate with that probability and stays with its version (stored on the conversation); when its version is
no longer served (rolled back, or promoted and the old champion gone) it continues on the champion. Nothing about the
choice lives only in this process, so a restart serves exactly what the aliases say.
"""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask

from tasks import env
from tasks.chat.serving import Serving, Target, canary_arm, fixed_plan
from tasks.chat.tracing import make_tracer

log = logging.getLogger("tasks.chat")
__all__ = ["ModelState", "Serving", "Target", "create_app"]


class ModelState:
    """The served models and hot reload."""

    def __init__(self, cfg, loader, planner=None, config_source=None):
        from tasks.chat.engine import Generator

        self.cfg, self.loader, self.planner = cfg, loader, planner or fixed_plan
        self.config_source = config_source  # the app's config file(s): re-read on reload, like a restart would
        # The settings requests read (limits, prompt, generation lengths): those of the last successful load, so a
        # deploy's per-run overrides apply on a reload as on a restart. Process settings (port, threads, batch size,
        # pools) stay as started.
        self.live_cfg = cfg
        self.serving = Serving()
        self.pinned: str | None = None
        self.generator = Generator(cfg.chat.max_batch_size, cfg.chat.max_queue)
        self.reload_state = {"state": "idle", "error": None, "target": None, "started_at": None}
        self._lock = threading.Lock()

    @property
    def handle(self):
        """The champion (the model every conversation falls back to)."""
        return self.serving.champion

    @property
    def candidate(self):
        return self.serving.candidate

    def choose(self, conversation_id: str):
        """The model a new conversation is served by."""
        s = self.serving
        return s.candidate if s.candidate is not None and canary_arm(conversation_id, s.share) else s.champion

    def for_version(self, version: str | None):
        """The model of a conversation that started on ``version``: that one while it is served, else the champion."""
        s = self.serving
        return s.candidate if s.candidate is not None and s.candidate.version == version else s.champion

    def reload(self, uri: str | None = None, wait: bool = False) -> bool:
        """Load what the aliases say (or only ``uri``) in the background and swap it in; False when busy."""
        with self._lock:
            if self.reload_state["state"] == "loading":
                return False
            self.reload_state = {"state": "loading", "error": None, "target": uri or "default",
                                 "started_at": time.time()}
        thread = threading.Thread(target=self._load, args=(uri,), name="model-loader", daemon=True)
        thread.start()
        if wait:
            thread.join()
        return True

    def _config(self):
        if self.config_source is None:
            return self.cfg
        from tasks.config import ConfigError, load_config

        try:
            return load_config(self.config_source)
        except ConfigError as exc:  # a broken file must not stop a reload: the start-up config still holds
            log.error("config %s unreadable on reload (%s); using the start-up config", self.config_source, exc)
            return self.cfg

    def _load(self, uri: str | None) -> None:
        old = self.serving
        try:
            cfg = self._config()
            targets = fixed_plan(cfg, uri) if uri else self.planner(cfg)
            champion = self._handle(cfg, targets[0], old)
        except Exception as exc:  # the old model keeps serving; the failure is visible in /api/model
            log.error("model load failed, still serving %s: %s", old.champion and old.champion.version, exc)
            self.reload_state.update(state="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            return
        candidate, share, error = None, 0.0, None
        for target in targets[1:]:
            try:
                candidate, share = self._handle(cfg, target, old), target.share
            except Exception as exc:  # a candidate that cannot load never takes the champion down with it
                error = f"candidate version {target.version}: {type(exc).__name__}: {exc}"[:500]
                log.error("canary not served, the champion serves alone: %s", error)
        self.serving, self.pinned, self.live_cfg = Serving(champion, candidate, share), uri, cfg
        self.reload_state.update(state="failed" if error else "idle", error=error)
        log.info("serving model version %s (was %s)%s", champion.version, old.champion and old.champion.version,
                 f"; canary version {candidate.version} gets {share:.0%} of new conversations" if candidate else "")

    def _handle(self, cfg, target: Target, old: Serving):
        """A served handle of ``target`` when it is the same registry version (a promotion swaps, loads nothing),
        else a freshly loaded one."""
        for h in (old.champion, old.candidate):
            if h is not None and target.version and h.version == target.version and h.info.get("name") == target.name:
                return h
        handle = self.loader(cfg, target.uri)
        if handle.decoder is not None:
            self._warm_up(handle)
        return handle

    def _warm_up(self, handle) -> None:
        """Compile the static decode step before the swap, so no request waits for the compiler. The compile runs
        here, beside the serving model; only the CUDA-graph capture, which belongs to the thread that will replay
        the graph, runs on the generation worker (a pause of a few steps for the replies in flight)."""
        try:
            compiled = handle.decoder.warm_up()
            captured = self.generator.call(handle.decoder.warm_up, timeout=self.cfg.chat.deploy_timeout_s)
            log.info("decode step of version %s ready: %.1fs to compile (%s), %.2fs on the generation worker",
                     handle.version, compiled, "compiled" if handle.decoder.compiled else "eager", captured)
        except Exception as exc:  # the version still serves, on the dynamic cache
            log.warning("decode step warm-up failed (%s: %s); version %s decodes with the dynamic cache",
                        type(exc).__name__, exc, handle.version)
            handle.decoder = None


def create_app(config=None, *, loader=None, wait_for_model: bool = False) -> Flask:
    """Build the app. ``config`` is a Config, a YAML path or None ($ECB_CONFIG); ``loader(cfg, uri)`` loads a model
    (default: tasks.chat.models.load, with the registry's aliases deciding what to load); ``wait_for_model`` loads
    before returning (tests, scripts)."""
    from tasks.config import Config, load_config
    from tasks.io import db, s3

    cfg = config if isinstance(config, Config) else load_config(config)
    planner = None
    if loader is None:
        from tasks.chat.models import load as loader
        from tasks.chat.models import plan as planner
    # Always timestamped: the service writes its own log file, nothing stamps the lines for it.
    logging.basicConfig(level=cfg.pipeline.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The request threads share the database pool, so the service has its own size.
    db.configure(pool_size=cfg.chat.db_pool_size, retry_s=cfg.storage.db_retry_s)
    s3.configure(cfg.storage)
    app = Flask(__name__)
    app.config.update(ECB=cfg, MAX_CONTENT_LENGTH=max(64 * 1024, cfg.chat.max_message_chars * 8),
                      JSON_SORT_KEYS=False)
    source = None if isinstance(config, Config) else (config or "")
    app.extensions["ecb_model"] = ModelState(cfg, loader, planner, source)
    app.extensions["ecb_tracer"] = make_tracer(cfg, env.get("MLFLOW_TRACKING_URI"))

    from tasks.chat import admin, api, openai_api, web

    app.register_blueprint(web.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(openai_api.bp)
    web.install_headers(app)
    app.extensions["ecb_model"].reload(wait=wait_for_model)
    return app
