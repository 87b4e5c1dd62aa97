"""The chat service as bench/chat.py starts it: ``tasks.chat.create_app()`` unchanged, plus one read-only route,
``GET /bench/decoder``, that says which decode path really ran -- a silent fallback to eager decoding would report
eager tokens/s as the GPU figure.

    gunicorn ... 'bench.chat_app:create_app()'

The report is taken on the generation worker thread (``Generator.call``), because a CUDA graph tree belongs to the
thread that captured and replays it.
"""

from __future__ import annotations


def create_app():
    from flask import jsonify

    from tasks.chat import create_app as service_app

    app = service_app()

    @app.get("/bench/decoder")
    def decoder():
        return jsonify(decoder_report(app.extensions["ecb_model"]))

    return app


def decoder_report(state) -> dict:
    """What the served model's decode step is: static cache or not, compiled or not, CUDA graphs recorded, and how
    often the compiled step failed and decoding fell back to eager (``StaticDecoder.fallbacks``)."""
    from tasks.chat import static_cache

    handle = state.handle
    if handle is None:
        return {"loaded": False}
    device = next(handle.model.parameters()).device
    chat = state.cfg.chat
    static_wanted = static_cache.wanted(chat.static_cache, device) and not static_cache.unsupported_reason(handle.model)
    compile_wanted = static_wanted and static_cache.wanted(chat.compile, device)
    dec = handle.decoder
    report = {"loaded": True, "device": str(device), "static_cache_wanted": static_wanted,
              "compile_wanted": compile_wanted, "static_cache": dec is not None,
              "compiled": dec is not None and dec.compiled is not None,
              # a compiled call that failed, plus a warm-up failure (the version then decodes with the dynamic cache)
              "eager_fallbacks": (getattr(dec, "fallbacks", 0) if dec is not None else 0)
              + int(static_wanted and dec is None),
              "decode_steps": getattr(state.generator, "steps", None),
              # requests that arrived together share one prefill pass: requests / passes says how much they did
              "prefill_passes": getattr(state.generator, "prefill_passes", None),
              "prefill_requests": getattr(state.generator, "prefilled", None), **_compiler_counters()}
    if device.type == "cuda" and report["compiled"]:
        try:
            report["cuda_graphs_recorded"] = state.generator.call(lambda: _cuda_graphs(device.index or 0), timeout=30)
        except RuntimeError as exc:  # the worker is busy or torch's internals moved: say so, do not guess
            report["cuda_graphs_recorded"] = None
            report["cuda_graphs_error"] = str(exc)[:300]
        report["graph_captured"] = bool(report["cuda_graphs_recorded"]) and report["cudagraph_skips"] == 0
    else:
        report["graph_captured"] = None if device.type != "cuda" else False  # CPU: no CUDA graphs to capture
    report["path"] = _path(report)
    report["as_configured"] = (report["static_cache"] == static_wanted and report["compiled"] == compile_wanted
                               and report["eager_fallbacks"] == 0
                               and (report["graph_captured"] is not False or not compile_wanted))
    return report


def _path(r: dict) -> str:
    if not r["static_cache"]:
        return "dynamic cache, eager"
    if not r["compiled"]:
        return "static cache, eager"
    return {True: "static cache, compiled, CUDA graphs", False: "static cache, compiled, NO CUDA graphs",
            None: "static cache, compiled (CPU: no CUDA graphs)"}[r["graph_captured"]]


def _compiler_counters() -> dict:
    from torch._dynamo.utils import counters

    return {"dynamo_graphs": int(counters["stats"]["unique_graphs"]),
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def _cuda_graphs(device_index: int) -> int:
    """CUDA graphs recorded by this thread's cudagraph tree (torch.compile mode="reduce-overhead")."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(device_index, create_if_none_exists=False)
    if manager is None:
        return 0
    nodes, stack = 0, [node for group in manager.roots.values() for node in group]
    while stack:
        node = stack.pop()
        nodes += 1
        stack.extend(child for group in node.children.values() for child in group)
    return nodes
