"""Traffic-aware rebuilds, as part of the one decision: judge the serving engine's envelope against the traffic the
snapshot carries, and recommend or (rebuildPolicy Auto) raise the shapes. Pure.

Judged only while the desired engine serves (phase Ready): traffic seen by an older engine says nothing about a
newer one. The operator never writes spec: Auto keeps the raised shapes in status.envelope.autoShapes, which the
planner applies as a floor (they become part of the engine identity, so a rebuild and a rollout follow like any
change).
"""

from __future__ import annotations

from llmengine.api import conditions as cond
from llmengine.api.v1alpha1 import EnvelopeStatus, LLMEngineStatus, Recommendation, TrafficStatus
from llmengine.clock import iso
from llmengine.plan import envelope
from llmengine.plan import traffic as tr
from llmengine.reconcile.snapshot import Snapshot

Event = tuple[str, str, str]


def judge(snap: Snapshot, st: LLMEngineStatus, events: list[Event]) -> bool:
    """Set status.traffic, status.envelope and EnvelopeExceeded in `st` from the snapshot's traffic; True when Auto
    raised the shapes (the next pass plans with them)."""
    plan, spec, view = snap.plan, snap.spec, snap.traffic
    if view is None or spec is None or st.serving_engine is None or st.serving_engine.digest != plan.engine_digest:
        return False  # not read this pass: the status keeps what the last reading said
    env = st.envelope.model_copy(deep=True) if st.envelope is not None else EnvelopeStatus()
    shapes = plan.shapes
    if env.max_input_len != shapes.max_input_len or env.max_seq_len != shapes.max_seq_len:
        # Another engine serves now: what was exceeded was exceeded by the previous one.
        env.exceeded = None
        env.recommendation = None
    env.max_batch_size, env.max_input_len = shapes.max_batch_size, shapes.max_input_len
    env.max_seq_len, env.max_num_tokens = shapes.max_seq_len, shapes.max_num_tokens
    st.envelope = env
    stamp = iso(snap.now)

    def setc(status: cond.Status, reason: str, message: str) -> None:
        st.conditions = cond.set_condition(
            st.conditions or [], cond.ENVELOPE_EXCEEDED, status, reason, message[:2048], snap.generation, stamp
        )

    if view.newest is None or view.start is None:
        if view.answered:
            setc(
                "Unknown", "Observing", "first snapshot of this engine's traffic taken; the profile needs a second one"
            )
        elif view.error:
            setc("Unknown", "NoMetrics", view.error)
        elif view.asked:
            n = len(view.asked)
            shown = ", ".join(sorted(view.asked)[:3]) + (f" and {n - 3} more" if n > 3 else "")
            setc("Unknown", "NoMetrics", f"no serving pod answered at {shown}")
        else:
            setc("Unknown", "NoMetrics", "no ready serving pod of this engine to read traffic from")
        return False

    newest, start = view.newest, view.start
    profile = tr.profile(tr.window_delta(newest, start), newest.at - start.at, stamp)
    st.traffic = TrafficStatus.model_validate(profile)
    verdict = envelope.judge(profile, shapes, spec.rebuild_policy)
    env.refused_too_long = st.traffic.rejected_too_long or 0
    env.refused_to_act = envelope.refusals_to_act(spec.rebuild_policy, st.traffic.requests or 0)
    env.exceeded = [envelope.CAMEL[e.limit] for e in verdict.exceeded] or None
    message, raised = verdict.message, False
    if verdict.status == "True":
        patch = envelope.recommended_patch(spec, shapes, verdict.target)
        env.recommendation = Recommendation(
            reason=verdict.message,
            patch=envelope.patch_text(patch) if patch else None,
            shapes={envelope.CAMEL[k]: v for k, v in sorted(verdict.target.items())},
        )
        if spec.rebuild_policy.mode == "Auto":
            floor = envelope.shape_floor(spec, st) or {}
            auto = envelope.auto_step(verdict, spec.rebuild_policy, floor, env.last_auto_rebuild, snap.now, snap.fits)
            if auto.auto_shapes is not None:
                env.auto_shapes = {envelope.CAMEL[k]: v for k, v in sorted(auto.auto_shapes.items())}
                env.last_auto_rebuild = auto.rebuilt_at
                events.append(("Normal", "AutoRebuild", f"{verdict.message}: {auto.message}"))
                raised = True
            if auto.message:
                message = f"{message}; {auto.message}"
        else:
            message += "; rebuildPolicy Manual: apply status.envelope.recommendation.patch to rebuild"
    elif verdict.status == "False":
        env.recommendation = None
    old = cond.get_condition(st.conditions, cond.ENVELOPE_EXCEEDED)
    if verdict.status == "True" and (old is None or old.status != "True"):
        events.append(("Warning", "EnvelopeExceeded", message))
    status: cond.Status = "True" if verdict.status == "True" else "False" if verdict.status == "False" else "Unknown"
    setc(status, verdict.reason, message)
    return raised
