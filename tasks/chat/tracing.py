"""Every chat reply as an MLflow trace, and every thumb as an MLflow feedback assessment, exported off the request path.

A reply (page chat or /v1 completion) becomes one trace in the ``chat.trace_experiment`` experiment: a root span
``chat`` (inputs: the new user message; outputs: the reply) with child spans ``prompt`` (history read and chat
template), ``queue`` (waiting for a row of the generation worker), ``prefill`` and ``decode``, timed from the
request's own clocks; attributes: model version, route, tokens in and out, time to first token, finish reason. Trace
metadata ``mlflow.trace.session`` = the conversation id (MLflow's sessions view groups a conversation's turns) and
tag ``ecb.message_id`` (how a later thumb finds its trace).

Why a thread of its own: the request only puts a record on a bounded queue and returns; the exporter thread talks to
MLflow. When MLflow is slow or down the queue fills and records are dropped (counted in ``stats``, logged once a
minute): an outage loses traces, never chats. Thumbs go through the same queue to ``mlflow.log_feedback`` (name
``user_thumbs``, value true/false, source HUMAN) on the reply's trace, found from this process's recent traces or by
the ``ecb.message_id`` tag.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from tasks import env

log = logging.getLogger("tasks.chat.tracing")
MESSAGE_TAG = "ecb.message_id"
FEEDBACK_NAME = "user_thumbs"
RECENT = 10_000  # message id -> trace id of this process's latest traces


@dataclass
class Reply:
    """What a trace is made of: ids, texts and the request's monotonic clock readings (seconds)."""

    conversation_id: str
    message_id: int
    model_version: str | None
    route: str  # "page" or "v1"
    user_text: str
    reply_text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    started: float  # request began (before the prompt was built)
    prompt_built: float
    submitted: float  # queued for the generation worker
    admitted: float | None  # its prefill began
    first_token: float | None
    ended: float
    wall_offset: float = field(default_factory=lambda: time.time() - time.monotonic())

    def ns(self, t: float | None, default: float) -> int:
        return int(((default if t is None else t) + self.wall_offset) * 1e9)


@dataclass
class Thumb:
    message_id: int
    rating: int


class Tracer:
    """The exporter thread and its queue; ``record``/``thumb`` never block."""

    def __init__(self, tracking_uri: str, experiment: str, max_queue: int = 1000):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.stats = {"exported": 0, "feedback": 0, "dropped": 0, "failed": 0}
        self.recent: OrderedDict[int, str] = OrderedDict()
        self._experiment_id: str | None = None
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracer", daemon=True)
        self._thread.start()

    def record(self, reply: Reply) -> None:
        self._put(reply)

    def thumb(self, message_id: int, rating: int) -> None:
        self._put(Thumb(message_id, rating))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is exported or given up (tests, shutdown); False on time-out."""
        deadline = time.monotonic() + timeout
        with self.queue.all_tasks_done:  # Queue.join() with a time-out: task_done() notifies this condition
            while self.queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.queue.all_tasks_done.wait(left)
        return True

    def _put(self, item) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.stats["dropped"] += 1
            self._warn(f"trace queue full ({self.queue.maxsize}): MLflow is slow or down; dropped "
                       f"{self.stats['dropped']} so far (chats are not affected)")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            log.warning(message)

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            try:
                self._export(item)
            except Exception as exc:  # noqa: BLE001 -- MLflow down or refusing: the trace is lost, chats go on
                self.stats["failed"] += 1
                self._experiment_id = None  # look it up again: the server may have been replaced
                self._warn(f"MLflow trace export failed ({type(exc).__name__}: {str(exc)[:200]}); "
                           f"{self.stats['failed']} lost so far (chats are not affected)")
            finally:
                self.queue.task_done()

    def _export(self, item) -> None:
        if isinstance(item, Thumb):
            self._feedback(item)
        else:
            self._trace(item)

    def _experiment(self) -> str:
        # The export itself goes to the process's tracking URI ($MLFLOW_TRACKING_URI, which make_tracer was given):
        # the tracer never sets MLflow's global URI, which the registry loads of this process share.
        if self._experiment_id is None:
            import mlflow

            client = mlflow.MlflowClient(self.tracking_uri)
            found = client.get_experiment_by_name(self.experiment)
            self._experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
        return self._experiment_id

    def _trace(self, r: Reply) -> None:
        import mlflow
        from mlflow.entities import SpanType

        experiment_id = self._experiment()
        attrs = {"model_version": r.model_version or "", "route": r.route, "prompt_tokens": r.prompt_tokens,
                 "completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason,
                 "ttft_ms": round((r.first_token - r.submitted) * 1000, 2) if r.first_token else None}
        root = mlflow.start_span_no_context(
            "chat", span_type=SpanType.CHAT_MODEL, inputs={"message": r.user_text}, attributes=attrs,
            tags={MESSAGE_TAG: str(r.message_id)}, experiment_id=experiment_id,
            metadata={"mlflow.trace.session": r.conversation_id}, start_time_ns=r.ns(r.started, r.started))
        first = r.first_token or r.ended
        admitted = r.admitted or first
        for name, start, end in (("prompt", r.started, r.prompt_built), ("queue", r.submitted, admitted),
                                 ("prefill", admitted, first), ("decode", first, r.ended)):
            span = mlflow.start_span_no_context(name, parent_span=root, start_time_ns=r.ns(start, start))
            span.end(end_time_ns=r.ns(end, end))
        root.end(outputs={"reply": r.reply_text}, end_time_ns=r.ns(r.ended, r.ended))
        self.recent[r.message_id] = root.trace_id
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        self.stats["exported"] += 1

    def _feedback(self, t: Thumb) -> None:
        import mlflow
        from mlflow.entities import AssessmentSource, AssessmentSourceType

        trace_id = self.recent.get(t.message_id) or self._find(t.message_id)
        if trace_id is None:  # a reply from before tracing was on, or whose trace was lost
            log.info("no MLflow trace for message %d: its thumb is stored in Postgres only", t.message_id)
            return
        mlflow.log_feedback(trace_id=trace_id, name=FEEDBACK_NAME, value=t.rating == 1,
                            source=AssessmentSource(source_type=AssessmentSourceType.HUMAN,
                                                    source_id="chat-user"))
        self.stats["feedback"] += 1

    def _find(self, message_id: int) -> str | None:
        import mlflow

        traces = mlflow.search_traces(locations=[self._experiment()], return_type="list", max_results=1,
                                      filter_string=f"tag.`{MESSAGE_TAG}` = '{int(message_id)}'")
        return traces[0].info.trace_id if traces else None


def make_tracer(cfg, tracking_uri: str | None) -> Tracer | None:
    """The service's tracer: None when chat.tracing is off or no MLflow tracking server is configured."""
    if cfg.chat.tracing == "off" or not tracking_uri:
        return None
    # Export in the tracer's own thread, synchronously: a failure is counted here, and a thumb never reaches
    # MLflow before the trace it rates (MLflow's async export would queue the trace in a pool of its own).
    env.export({"MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false"})
    log.info("chat replies are traced to MLflow experiment %r at %s", cfg.chat.trace_experiment, tracking_uri)
    return Tracer(tracking_uri, cfg.chat.trace_experiment, cfg.chat.trace_queue)
