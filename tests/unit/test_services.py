"""Each service's app.py imports without starting anything, and its logic runs without NATS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from shared.config import load_config
from shared.schema import (
    ChatMessage,
    Envelope,
    Error,
    ErrorCode,
    Passage,
    Request,
    Step,
)
from shared.settings import ROOT, Settings

SERVICES = ("router", "retriever", "generator", "guardrail", "fallback")

# Run in a fresh interpreter: what the import alone started (threads, sockets, tracing).
PROBE = """
import importlib, json, os, sys, threading
from opentelemetry import trace
module = importlib.import_module(f"services.{sys.argv[1]}.app")
def kind(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the listing's own descriptor, closed by now
        return ""
sockets = [fd for fd in os.listdir("/proc/self/fd") if kind(fd).startswith("socket:")]
print(json.dumps({
    "threads": [t.name for t in threading.enumerate() if t is not threading.main_thread()],
    "sockets": len(sockets),
    "tracer_provider": type(trace.get_tracer_provider()).__name__,
    "connected": module.mesh.runtime.nc is not None,
}))
"""


@pytest.mark.parametrize("service", SERVICES)
def test_importing_a_service_starts_nothing(service, tmp_path):
    # Everything that would start something is asked for: a metrics port, an OTLP endpoint, an index dir.
    env = {**os.environ, "BATON_METRICS_PORT": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "BATON_INDEX_DIR": str(tmp_path / "no-index")}
    done = subprocess.run([sys.executable, "-c", PROBE, service], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    started = json.loads(done.stdout.strip().splitlines()[-1])
    assert started == {"threads": [], "sockets": 0, "tracer_provider": "ProxyTracerProvider", "connected": False}


# -- the guardrail's scrub ---------------------------------------------------------------


def test_scrub_request_leaves_no_redacted_value_on_the_envelope():
    from services.guardrail.app import scrub_request

    spec = load_config(Settings().config).guard
    env = Envelope(
        request_id="q-1", route="factual", slip=[Step(service="guardrail", name="guard.input")], deadline=time.time() + 30,
        request=Request(messages=[ChatMessage(role="user", content="mail me at jo@example.com")]),
    )
    env.context.history = [ChatMessage(role="user", content="I am jo@example.com")]
    scrub_request(env, "mail me at [REDACTED_EMAIL]", spec)
    assert "jo@example.com" not in env.model_dump_json()
    assert env.context.question == "mail me at [REDACTED_EMAIL]"


# -- the fallback's degraded answer -------------------------------------------------------


def degraded(code: ErrorCode, passages: list[Passage]) -> Envelope:
    env = Envelope(
        request_id="q-1", route="factual", slip=[Step(service="generator", name="generate")], deadline=time.time() + 30,
        request=Request(prompt="How often should I replace my chain?"), error=Error(code=code, message="down"),
    )
    env.context.question = env.request.prompt or ""
    env.context.passages = passages
    return env


def test_degrade_answers_from_the_passages_redacted_and_marked_degraded():
    from services.fallback.app import degrade

    config = load_config(Settings().config)
    passage = Passage(source="chain.md", text="Replace the chain every 3000 km. Questions: call 555-123-4567 or jo@example.com.", score=3.0)
    env = degraded(ErrorCode.MODEL_ERROR, [passage])
    degrade(env, config)
    assert env.error is None and env.context.degraded
    assert "3000 km" in env.context.answer and "jo@example.com" not in env.context.answer
    assert env.context.citations == [1]


def test_degrade_without_context_says_so():
    from services.fallback.app import degrade
    from services.fallback.policy import NO_CONTEXT_ANSWER

    env = degraded(ErrorCode.NO_CONTEXT, [])
    degrade(env, load_config(Settings().config))
    assert env.context.answer == NO_CONTEXT_ANSWER and env.context.citations == [] and env.context.degraded
