"""Shadow traffic: a candidate model answers on the side; its answer is kept, never returned.

The shadow call runs after the hop has moved on, bounded in time, so it adds no
latency to the request. What it said, what it cost and how long it took land in the
shadow bucket under the request id, next to the primary model's name, for offline
comparison.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from opentelemetry.trace import SpanKind

from services.generator.models import Choice, ModelCall, ModelPool
from shared import attributes as A
from shared import metrics, subjects
from shared.schema import Envelope

log = logging.getLogger("baton.shadow")
SHADOW_TIMEOUT_S = 30.0


class ShadowRunner:
    def __init__(self, mesh):
        self.mesh = mesh
        self._tasks: set[asyncio.Task] = set()  # held so they are not garbage-collected mid-flight

    def start(self, env: Envelope, model: str, call: ModelCall, pool: ModelPool, primary: str) -> None:
        task = asyncio.create_task(self._run(env.request_id, env.route, primary, model, call, pool))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request_id: str, route: str, primary: str | None, model: str, call: ModelCall, pool: ModelPool) -> None:
        started = time.time()
        record: dict[str, Any] = {"request_id": request_id, "route": route, "primary_model": primary, "shadow_model": model}
        with self.mesh.tracer.start_as_current_span(f"shadow chat {model}", kind=SpanKind.CLIENT, attributes={A.OI_KIND: A.LLM, A.GEN_AI_OPERATION: "chat", A.GEN_AI_REQUEST_MODEL: model, A.LLM_MODEL_NAME: model, A.SHADOW: True}):
            try:
                reason = pool.unavailable_reason(model)
                if reason:
                    raise RuntimeError(reason)
                choice = Choice(model, pool.config.models[model])
                generation = await asyncio.wait_for(pool.generate(choice, call, SHADOW_TIMEOUT_S), SHADOW_TIMEOUT_S)
                record.update(answer=generation.text, usage=generation.usage.model_dump(), cost_usd=pool.cost_usd(choice.spec, generation), outcome="ok")
            except Exception as exc:  # a failing candidate is a finding, not an incident
                record.update(outcome="error", error=f"{type(exc).__name__}: {exc}")
        record["latency_ms"] = round((time.time() - started) * 1000, 2)
        metrics.SHADOW_CALLS.labels(model, record["outcome"]).inc()
        try:
            bucket = await self.mesh.kv(subjects.SHADOW_BUCKET)
            await bucket.put(request_id, json.dumps(record).encode())
        except Exception:
            log.exception("request %s: could not store the shadow answer", request_id)
