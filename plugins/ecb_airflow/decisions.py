"""The DAGs' decisions, as pure functions of step manifests: go on to train, ask a person, release or not, and
whether the landing prefix holds new raw data.

Each returns its answer and the one sentence the task logs, so the rule is unit-tested without Airflow.
"""

from __future__ import annotations

from datetime import datetime

RELEASE_TASK = "register_model"
SKIP_TASK = "skip_release"
APPROVE, REJECT = "Approve", "Reject"  # the options of the approval task; Reject is also its timeout answer


def keep_training(prep: dict, force_retrain: bool) -> tuple[bool, str]:
    """Whether the run trains after ``prepare_chatml`` (its manifest ``prep``): not when the snapshot and training
    config equal those of the released model, unless ``force_retrain`` is set."""
    release = prep.get("last_release")
    if force_retrain:
        return True, f"Continuing: force_retrain is set (snapshot {prep['snapshot_id']})."
    if prep["unchanged_since_release"]:
        return False, (f"Stopping early: snapshot {prep['snapshot_id']} and config hash {prep['config_hash']} equal "
                       f"those of release {release['registry_version']} (run {release['run_id']}); "
                       "set force_retrain to train anyway.")
    last = f"snapshot {release['snapshot_id']}, config {release['config_hash']}" if release else "none yet"
    return True, (f"Continuing: snapshot {prep['snapshot_id']} / config {prep['config_hash']} differ from the last "
                  f"release ({last}).")


def gate_branch(decision: dict, approval: dict | None = None) -> tuple[str, str]:
    """The task the run follows after the ``quality_gate`` step (its manifest ``decision``), and why. When a person
    was asked, the ``record_approval`` manifest (``approval``) decides: it releases only what the gate released and a
    person approved."""
    final = approval or decision
    branch = RELEASE_TASK if final["release"] else SKIP_TASK
    return branch, f"Gate decision {final['decision_id']} -> {branch}: {final['summary']}"


def final_summary(decision: dict, approval: dict | None = None) -> str:
    """The sentence that says why the run did or did not release: the person's answer when there was one."""
    return (approval or decision)["summary"]


def _ci_includes_zero(decision: dict) -> bool:
    low, high = decision.get("ci_low"), decision.get("ci_high")
    return low is not None and high is not None and low <= 0.0 <= high


def _ci_missing(decision: dict) -> bool:
    """Compared with a champion (a delta exists) but without an interval: the improvement is unchecked."""
    return decision.get("delta") is not None and (decision.get("ci_low") is None or decision.get("ci_high") is None)


def approval_needed(decision: dict, require_approval: bool) -> tuple[bool, str]:
    """Whether a person must approve the release the ``quality_gate`` step decided (its manifest ``decision``).

    Only a release is ever put to a person (nobody can approve past a gate that blocked). It is when
    ``gate.require_approval`` is set, when the bootstrap 95% CI of the score delta includes zero (the gate released
    on an improvement that may be noise), or when the gate compared with a champion but has no CI at all (fail
    closed: an unchecked improvement is not taken as a significant one). A forced release (``force_deploy``) skips
    the CI rules, since the person who forced it has decided already; ``require_approval`` still applies to it."""
    did = decision["decision_id"]
    if not decision["release"]:
        return False, f"No approval asked: gate decision {did} keeps the champion ({decision['summary']})."
    why = []
    if require_approval:
        why.append("gate.require_approval is set")
    if _ci_includes_zero(decision) and not decision.get("forced"):
        why.append(f"the bootstrap 95% CI of the score delta, [{decision['ci_low']:+.4f}, "
                   f"{decision['ci_high']:+.4f}], includes 0: the improvement may be noise")
    if _ci_missing(decision) and not decision.get("forced"):
        versus = decision.get("versus") or "champion"
        why.append(f"the gate compared with the {versus} (delta {decision['delta']:+.4f}) but has no confidence "
                   f"interval ({decision.get('ci_problem') or 'none was computed'}): the improvement is unchecked")
    if not why:
        if decision.get("ci_low") is not None:
            ci = f"the CI is [{decision['ci_low']:+.4f}, {decision['ci_high']:+.4f}]"
        elif decision.get("delta") is None:
            ci = "there is no champion to compare with"
        else:
            ci = "the release was forced (force_deploy) without a CI"
        return False, f"No approval asked: gate decision {did} releases, require_approval is off and {ci}."
    return True, f"Approval asked for gate decision {did}: " + "; ".join(why) + "."


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def approval_body(decision: dict, why: str, timeout_s: int) -> str:
    """Markdown shown to the person who approves: the gate's numbers, its reasons and what happens on no answer."""
    rows = [("Gate decision", f"{decision['decision_id']} ({'forced' if decision.get('forced') else 'gate verdict'})"),
            ("Weighted score delta (candidate - champion)", _fmt(decision.get("delta"))),
            ("Bootstrap 95% CI of the delta", f"[{_fmt(decision.get('ci_low'))}, {_fmt(decision.get('ci_high'))}]")]
    lines = [f"**{decision['summary']}**", "", why, "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "Gate reasons:", *[f"- {r}" for r in decision.get("reasons") or []], "",
              f"**{APPROVE}** registers and deploys the candidate; **{REJECT}** keeps the champion. Without an answer "
              f"within {timeout_s} s the candidate is not released."]
    return "\n".join(lines)


def approval_answer(event: dict, why: str) -> dict:
    """The person's answer (the approval task's resume payload) as the JSON the ``record_approval`` step reads:
    status approved / rejected / timed_out (the timeout answers Reject, with nobody as the responder)."""
    user = event.get("responded_by_user") or {}
    at = event.get("responded_at")
    if event.get("timedout") or not user:
        status = "timed_out"
    else:
        status = "approved" if list(event.get("chosen_options") or []) == [APPROVE] else "rejected"
    return {"status": status, "by": user.get("name"), "by_id": user.get("id"),
            "at": at.isoformat() if isinstance(at, datetime) else at,
            "comment": str((event.get("params_input") or {}).get("comment") or ""), "reason": why}


def landing_changed(listing: dict, last_event: dict | None) -> tuple[bool, str]:
    """Whether the landing listing (the ``list_landing`` manifest) differs from the one the last asset event of the
    landing asset announced (its extra; None when there was none): then new raw data has landed."""
    n, digest = listing["n_objects"], listing["digest"]
    if n == 0:
        return False, f"No raw data in {listing['source']}: nothing to announce."
    before = (last_event or {}).get("digest")
    if before == digest:
        return False, f"No change in {listing['source']}: {n} file(s), digest {digest[:12]} as last announced."
    was = f"digest {before[:12]}, {last_event.get('n_objects')} file(s)" if before else "none announced yet"
    return True, (f"New raw data in {listing['source']}: {n} file(s), {listing['n_bytes']} bytes, digest "
                  f"{digest[:12]} (before: {was}); announcing it.")
