"""Errors of the OpenAI-compatible API in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Client libraries (the ``openai`` package, LangChain, promptfoo) read ``error.message`` and ``error.code`` to tell a bad
request from a rate limit or an outage, so every /v1 answer that is not a success has this body, including the
routing errors (404, 405, 413) that Flask raises before any /v1 view runs.
"""

from __future__ import annotations

from flask import jsonify, request

PREFIX = "/v1/"


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


def is_v1() -> bool:
    return request.path.startswith(PREFIX)


def error_type(status: int) -> str:
    """OpenAI's error type of a status: rate limits are "requests", server faults "server_error", the rest the
    request's."""
    return "requests" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"


def response(status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
    body = {"message": message, "type": error_type(status), "param": param, "code": code}
    return jsonify(error=body), status, headers or {}
