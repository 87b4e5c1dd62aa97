"""The OpenAPI 3.0 document of the chat API, served at /openapi.json (schemathesis fuzzes the app against it)."""

from __future__ import annotations

import copy


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERR = {"$ref": "#/components/schemas/Error"}
TOKEN = {"name": "X-Client-Token", "in": "header", "required": True, "schema": {"type": "string"},
         "description": "The client_token returned when the conversation was created."}
CONV_ID = {"name": "conversation_id", "in": "path", "required": True, "schema": {"type": "string"}}
NULLABLE_STR = {"type": "string", "nullable": True}
NULLABLE_NUM = {"type": "number", "nullable": True}


OAI_ERR = {"$ref": "#/components/schemas/OpenAIError"}
V1_ERRORS = {400: "Invalid or unsupported request field (error.param names it)", 401: "API key missing or wrong",
             403: "No API key configured on this service", 404: "Unknown model, or the v1 API is off",
             413: "Request body too large", 429: "Rate limit of the API key exceeded",
             503: "Model not loaded yet or the queue is full"}


def _v1_errors(*codes: int) -> dict:
    return {str(c): _json(OAI_ERR, V1_ERRORS[c]) for c in codes}


def _errors(*codes: int) -> dict:
    text = {400: "Invalid JSON, wrong types or an empty message", 401: "Admin token missing or wrong",
            404: "Unknown conversation or message, or not this client's", 413: "Message over the length limit",
            409: "No model serves that arm", 429: "Rate limit exceeded",
            503: "Model not loaded yet or the queue is full"}
    return {str(c): _json(ERR, text[c]) for c in codes}


MAX_CHARS = 2000  # replaced by chat.max_message_chars in spec()
MESSAGE = {
    "type": "object", "required": ["id", "role", "content", "created_at"],
    "properties": {
        "id": {"type": "integer"}, "role": {"type": "string", "enum": ["user", "assistant"]},
        "content": {"type": "string"}, "created_at": {"type": "string"},
        "latency_ms": NULLABLE_NUM, "ttft_ms": NULLABLE_NUM,
        "prompt_tokens": {"type": "integer", "nullable": True},
        "completion_tokens": {"type": "integer", "nullable": True}, "finish_reason": NULLABLE_STR,
        "rating": {"type": "integer", "nullable": True, "enum": [1, -1, None]}},
    # closed: the fuzz test then fails a public answer that names a model version (a client that knows its canary
    # arm can steer the verdict); only the /admin schemas below carry it
    "additionalProperties": False}
CONVERSATION = {
    "type": "object", "required": ["id", "created_at", "messages"],
    "properties": {"id": {"type": "string"}, "created_at": {"type": "string"},
                   "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}}},
    "additionalProperties": False}
NEW_CONVERSATION = {
    "type": "object", "required": ["conversation_id", "client_token"],
    "properties": {"conversation_id": {"type": "string"}, "client_token": {"type": "string"}},
    "additionalProperties": False}


def _versioned(schema: dict, message_ref: str | None = None) -> dict:
    """``schema`` plus its model_version (required, null when none was loaded): the admin API's answers."""
    out = copy.deepcopy(schema)
    out["properties"]["model_version"] = NULLABLE_STR
    out["required"] = [*out["required"], "model_version"]
    if message_ref:
        out["properties"]["messages"]["items"] = {"$ref": f"#/components/schemas/{message_ref}"}
    return out


TEXT_PART = {"type": "object", "required": ["type", "text"],
             "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
CHAT_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]},
    "name": {"type": "string"}}}
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
         "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
V1_SCHEMAS = {
    "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": NULLABLE_STR,
                       "code": NULLABLE_STR}}}},
    "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": {
        "model": {"type": "string", "description": "champion, candidate, a served version, or anything GET "
                                                   "/v1/models lists as default (the canary rule decides)"},
        "messages": {"type": "array", "minItems": 1, "items": CHAT_MESSAGE},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "max_tokens": {"type": "integer", "minimum": 1}, "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "description": "0 or absent: greedy"},
        "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
        "seed": {"type": "integer"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": 4, "items": {"type": "string"}}]},
        "n": {"type": "integer", "enum": [1]}}},
    "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                       "properties": {
                           "id": {"type": "string", "description": "chatcmpl-<conversation id>: POST "
                                                                   "/api/messages/{id}/feedback rates it"},
                           "object": {"type": "string", "enum": ["chat.completion"]},
                           "created": {"type": "integer"}, "model": {"type": "string"},
                           "choices": {"type": "array", "items": {"type": "object"}}, "usage": USAGE}},
    "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": {"type": "object", "required": ["id", "object", "created", "owned_by"],
                                            "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                                           "created": {"type": "integer"},
                                                           "owned_by": {"type": "string"},
                                                           "version": NULLABLE_STR, "alias": {"type": "string"},
                                                           "base_model": NULLABLE_STR}}}}},
}

SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Message": MESSAGE,
    "Conversation": CONVERSATION,
    "NewConversation": NEW_CONVERSATION,
    "AdminMessage": _versioned(MESSAGE),
    "AdminConversation": _versioned(CONVERSATION, "AdminMessage"),
    "PinnedConversation": _versioned(NEW_CONVERSATION),
    "SendMessage": {
        "type": "object", "required": ["content"],
        "properties": {"content": {"type": "string", "minLength": 1, "maxLength": MAX_CHARS,
                                   # what the server accepts: some non-blank character (Python's str.strip, which
                                   # also strips \x1c-\x1f), and no NUL
                                   "pattern": "^[^\\u0000]*[^\\s\\u0000\\u001c-\\u001f][^\\u0000]*$",
                                   "description": "The user's message (plain text: not blank, no NUL)."},
                       "stream": {"type": "boolean", "description":
                                  "Stream the reply as Server-Sent Events (default: per Accept header)."}}},
    "Reply": {
        "type": "object", "required": ["user_message", "message"],
        "properties": {"user_message": {"$ref": "#/components/schemas/Message"},
                       "message": {"$ref": "#/components/schemas/Message"}},
        "additionalProperties": False},
    "Feedback": {"type": "object", "required": ["rating"],
                 "properties": {"rating": {"type": "integer", "enum": [1, -1]}}},
    "FeedbackStored": {"type": "object", "required": ["message_id", "rating"], "additionalProperties": False,
                       "properties": {"message_id": {"type": "integer"},
                                      "rating": {"type": "integer", "enum": [1, -1]}}},
    "ModelInfo": {
        "type": "object", "required": ["ready", "version", "reload", "queued"],
        "properties": {"ready": {"type": "boolean"}, "version": NULLABLE_STR, "name": NULLABLE_STR,
                       "alias": NULLABLE_STR, "uri": NULLABLE_STR, "base_model": NULLABLE_STR,
                       "loaded_at": {"type": "string"}, "queued": {"type": "integer"},
                       "reload": {"type": "object"}, "lineage": {"type": "object"}, "pinned": NULLABLE_STR,
                       "candidate": {"type": "object", "nullable": True,
                                     "description": "The canary served beside the champion (version, share, ...)"}}},
}


def spec(max_message_chars: int = MAX_CHARS) -> dict:
    schemas = copy.deepcopy(SCHEMAS)
    schemas["SendMessage"]["properties"]["content"]["maxLength"] = max_message_chars
    # One Server-Sent Event; its data is JSON: start {user_message}, token {text}, done {message}, error {error}.
    sse = {"text/event-stream": {"schema": {
        "type": "object", "required": ["event", "data"],
        "properties": {"event": {"type": "string", "enum": ["start", "token", "done", "error"]},
                       "data": {"type": "string", "description": "JSON object, see the event names"}}}}}
    paths = {
        "/healthz": {"get": {"summary": "Process is up", "responses": {"200": _json({"type": "object"}, "Up")}}},
        "/readyz": {"get": {"summary": "Model is loaded", "responses": {
            "200": _json({"type": "object"}, "Ready"), **_errors(503)}}},
        "/api/model": {"get": {"summary": "Serving model: version, alias, base model, load time and lineage",
                               "responses": {"200": _json({"$ref": "#/components/schemas/ModelInfo"}, "Model")}}},
        "/api/conversations": {"post": {
            "summary": "Start a conversation; keep the returned client_token, it is shown once",
            "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {"201": _json({"$ref": "#/components/schemas/NewConversation"}, "Created"),
                          **_errors(429)}}},
        "/api/conversations/{conversation_id}": {"get": {
            "summary": "A conversation's history", "parameters": [CONV_ID, TOKEN],
            "responses": {"200": _json({"$ref": "#/components/schemas/Conversation"}, "History"), **_errors(404)}}},
        "/api/conversations/{conversation_id}/messages": {"post": {
            "summary": "Send a message; the reply comes whole (JSON) or streamed (Server-Sent Events)",
            "parameters": [CONV_ID, TOKEN],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/SendMessage"}}}},
            "responses": {"200": {"description": "The reply", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Reply"}}, **sse}},
                **_errors(400, 404, 413, 429, 503)}}},
        "/api/messages/{message_id}/feedback": {"post": {
            "summary": "Thumbs up (1) or down (-1) on an assistant message, or on a /v1 completion by its id "
                       "(chatcmpl-...) with the API key that made it as a Bearer token",
            "parameters": [{"name": "message_id", "in": "path", "required": True,
                            "schema": {"oneOf": [{"type": "integer", "minimum": 0},
                                                 {"type": "string", "pattern": "^chatcmpl-"}]}},
                           {**TOKEN, "required": False}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Feedback"}}}},
            "responses": {"200": _json({"$ref": "#/components/schemas/FeedbackStored"}, "Stored"),
                          **_errors(400, 404, 429)}}},
        "/admin/conversations": {"post": {
            "summary": "A conversation pinned to the champion or the candidate (the deploy step's smoke test)",
            "security": [{"admin": []}],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"arm": {"type": "string", "enum": ["champion", "candidate"]}}}}}},
            "responses": {"201": _json({"$ref": "#/components/schemas/PinnedConversation"}, "Created"),
                          **_errors(400, 401, 409)}}},
        "/admin/conversations/{conversation_id}": {"get": {
            "summary": "Any conversation with the model version of it and of each message (people, simulated users)",
            "security": [{"admin": []}], "parameters": [CONV_ID],
            "responses": {"200": _json({"$ref": "#/components/schemas/AdminConversation"}, "History"),
                          **_errors(401, 404)}}},
        "/admin/reload": {"post": {
            "summary": "Load what the registry aliases say (champion, candidate) or only model_uri, then swap it in",
            "security": [{"admin": []}],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"model_uri": {"type": "string"}}}}}},
            "responses": {"202": _json({"type": "object"}, "Loading"), **_errors(400, 401)}}},
        "/v1/models": {"get": {
            "summary": "OpenAI-compatible: the models served (default, champion, candidate, versions)",
            "security": [{"apiKey": []}],
            "responses": {"200": _json({"$ref": "#/components/schemas/ModelList"}, "Models"),
                          **_v1_errors(401, 403, 404)}}},
        "/v1/chat/completions": {"post": {
            "summary": "OpenAI-compatible chat completion, whole (JSON) or streamed (SSE chat.completion.chunk "
                       "events ending with data: [DONE])",
            "security": [{"apiKey": []}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
            "responses": {"200": {"description": "The completion", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                "text/event-stream": {"schema": {"type": "string"}}}},
                **_v1_errors(400, 401, 403, 404, 413, 429, 503)}}},
    }
    return {"openapi": "3.0.3",
            "info": {"title": "E-commerce support chat", "version": "1.0.0",
                     "description": "Chat with the released support model. Conversations are reachable only with "
                                    "their id and the client token returned at creation."},
            "paths": paths,
            "components": {"schemas": {**schemas, **copy.deepcopy(V1_SCHEMAS)},
                           "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"},
                                               "apiKey": {"type": "http", "scheme": "bearer"}}}}
