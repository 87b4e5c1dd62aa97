"""The chat service: a Flask app factory serving the registry's champion model.

    flask --app 'tasks.chat:create_app()' run --port 8000                       # development
    gunicorn --worker-class gthread --workers 1 --threads 64 -b 127.0.0.1:8000 'tasks.chat:create_app()'

One process per device: generation runs on a single worker thread (``engine.Generator``) that batches every open
request, while gunicorn's threads only stream. The model is loaded by the factory (in the background by default, so
``/healthz`` answers at once and ``/readyz`` turns 200 when the model is in), never at import.
"""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask

log = logging.getLogger("tasks.chat")


class ModelState:
    """The serving model and hot reload. ``handle`` is swapped in one assignment, so a request sees old or new."""

    def __init__(self, cfg, loader):
        from tasks.chat.engine import Generator

        self.cfg, self.loader = cfg, loader
        self.handle = None
        self.generator = Generator(cfg.chat.max_batch_size, cfg.chat.max_queue)
        self.reload_state = {"state": "idle", "error": None, "target": None, "started_at": None}
        self._lock = threading.Lock()

    def reload(self, uri: str | None = None, wait: bool = False) -> bool:
        """Load ``uri`` (default: the configured model) in the background and swap it in; False when busy."""
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

    def _load(self, uri: str | None) -> None:
        try:
            handle = self.loader(self.cfg, uri)
        except Exception as exc:  # the old model keeps serving; the failure is visible in /api/model
            log.error("model load failed, still serving %s: %s", self.handle and self.handle.version, exc)
            self.reload_state.update(state="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            return
        if handle.decoder is not None:
            self._warm_up(handle)
        old, self.handle = self.handle, handle
        self.reload_state.update(state="idle")
        log.info("serving model version %s (was %s)", handle.version, old and old.version)

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
    (default: tasks.chat.models.load); ``wait_for_model`` loads before returning (tests, scripts)."""
    from tasks.config import Config, load_config
    from tasks.io import db, s3

    cfg = config if isinstance(config, Config) else load_config(config)
    if loader is None:
        from tasks.chat.models import load as loader
    # Always timestamped: the service writes its own log file, nothing stamps the lines for it.
    logging.basicConfig(level=cfg.pipeline.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The request threads share the database pool, so the service has its own size.
    db.configure(pool_size=cfg.chat.db_pool_size, retry_s=cfg.storage.db_retry_s)
    s3.configure(cfg.storage)
    app = Flask(__name__)
    app.config.update(ECB=cfg, MAX_CONTENT_LENGTH=max(64 * 1024, cfg.chat.max_message_chars * 8),
                      JSON_SORT_KEYS=False)
    app.extensions["ecb_model"] = ModelState(cfg, loader)

    from tasks.chat import admin, api, web

    app.register_blueprint(web.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    web.install_headers(app)
    app.extensions["ecb_model"].reload(wait=wait_for_model)
    return app
