"""The chat page and the security headers every response carries."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from tasks.chat import openai_errors

bp = Blueprint("web", __name__, template_folder="templates", static_folder="static", static_url_path="/static")

# No inline script or style anywhere: the page's JS and CSS are files, so the policy can forbid everything else.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@bp.get("/")
def index():
    chat = current_app.extensions["ecb_model"].live_cfg.chat  # the live config: a reload may change the texts
    return render_template("index.html", greeting=chat.greeting, examples=chat.example_questions)


def install_headers(app) -> None:
    origins = set(app.config["ECB"].chat.cors_origins)

    @app.after_request
    def headers(resp):
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        origin = request.headers.get("Origin")
        if origin and origin in origins:  # CORS is off unless chat.cors_origins names the origin
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Headers"] = "Content-Type, X-Client-Token"
            resp.headers["Vary"] = "Origin"
        return resp

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # JSON errors for the API (the status code's own text; never the request echoed back)
        if openai_errors.is_v1():
            return openai_errors.response(exc.code or 500, exc.description or exc.name, code=_snake(exc.name))
        return jsonify(error=exc.description or exc.name), exc.code

    @app.errorhandler(Exception)
    def crash(exc: Exception):
        current_app.logger.exception("unhandled error on %s %r", request.method, request.path[:200])
        if openai_errors.is_v1():
            return openai_errors.response(500, "internal error")
        return jsonify(error="internal error"), 500


def _snake(name: str) -> str:
    return name.lower().replace(" ", "_")
