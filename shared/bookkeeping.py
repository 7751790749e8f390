"""Per-request bookkeeping: the Reply (stored once, sent to the client's inbox), the
session turn, the reply cache and the tenant's day of spending.

Everything here happens once per request, at its end (or at a refusal), never per hop;
the transport it needs is the runtime's KV handles and its one publish.
"""

from __future__ import annotations

import logging
from contextlib import suppress

from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from opentelemetry import trace

from shared import metrics, subjects, telemetry
from shared.budgets import TenantLedger
from shared.cache import store as cache_store
from shared.fairness import FinishedNotes
from shared.replies import answer_reply, error_reply
from shared.runtime import Channel, HopRuntime, current_message_or_none
from shared.schema import ChatMessage, Envelope, Error, ErrorCode, Reply
from shared.sessions import SessionStore

log = logging.getLogger("baton.bookkeeping")
REPLY_ADDRESS = "_INBOX.{client_id}.reply.{request_id}"  # as the contract names it: subjects.reply_address
REPLY_CHANNEL = Channel(REPLY_ADDRESS, Reply, "reply", "The one Reply to a request: an answer or a structured error.", sends=True)
FINISHED_CHANNEL = Channel(subjects.FINISHED, list[tuple[str, str]], "finished", "Requests this service finished, as [client id, request id] pairs, for the router's per-client limit.", sends=True)


class RequestBook:
    def __init__(self, runtime: HopRuntime):
        self.runtime = runtime
        self._sessions: SessionStore | None = None
        runtime.sends(REPLY_CHANNEL)
        # The router frees the slot of a request it answers itself; any other service
        # tells it which requests it finished (shared/fairness.py).
        self.finished: FinishedNotes | None = None
        if runtime.service != "router":
            self.finished = FinishedNotes(self._send_finished)
            runtime.sends(FINISHED_CHANNEL)
            runtime.on_stop(self.finished.flush)

    async def _send_finished(self, body: bytes) -> None:
        await self.runtime.publish(subjects.FINISHED, body, traced=False)  # about many requests: part of no trace

    async def finish(self, env: Envelope) -> Reply:
        """After the last step (or the fallback's last word): the Reply, recorded and delivered."""
        span = trace.get_current_span()
        trace_id = telemetry.trace_id_of(span)
        if env.error is None and env.remaining_s() < 0:
            # The client stops waiting at its deadline: an answer after it is not an answer.
            env.error = Error(code=ErrorCode.DEADLINE_EXCEEDED, message=f"the answer was ready {-env.remaining_s() * 1000:.0f} ms after the request's deadline", step=env.steps[-1].step if env.steps else None)
        reply = answer_reply(env, trace_id) if env.error is None else error_reply(env.request_id, env.error, env, trace_id)
        telemetry.record_reply(span, reply)
        metrics.observe_reply(reply)
        if reply.ok and env.request.session_id:
            await self.remember_turn(env, reply)
        await self.account(env, reply)
        await self.deliver(reply, env.reply_to, env.client)
        return reply

    async def account(self, env: Envelope, reply: Reply) -> None:
        """After an answer: fill the cache, add the cost to the tenant's day."""
        try:
            config = await self.runtime.configs.get(env.config_version)
            key = env.context.cache_key
            if key and reply.ok and not reply.degraded:
                bucket = await self.runtime.kv(subjects.CACHE_BUCKET)
                await cache_store(bucket, key, reply, config.routes[env.route].cache.ttl_s, env.context.question)
            tenant = env.request.metadata.get("tenant")
            if tenant in config.tenants and reply.cost_usd > 0:
                ledger = TenantLedger(await self.runtime.kv(subjects.BUDGETS_BUCKET))
                await ledger.add(tenant, reply.cost_usd)
        except Exception:  # bookkeeping must not cost the user the answer
            log.exception("request %s: cache or budget bookkeeping failed", env.request_id)

    async def sessions(self) -> SessionStore:
        if self._sessions is None:
            kv = await self.runtime.kv(subjects.SESSIONS_BUCKET)
            spec = self.runtime.config.sessions
            self._sessions = SessionStore(kv, spec.max_turns, spec.max_chars)
        return self._sessions

    async def remember_turn(self, env: Envelope, reply: Reply) -> None:
        """Append the turn to the session; the question as the gates left it (redacted)."""
        if not env.request.session_id:
            return
        try:
            store = await self.sessions()
            await store.append(env.request.session_id, ChatMessage(role="user", content=env.context.question), ChatMessage(role="assistant", content=reply.answer or ""))
        except Exception:  # a lost turn must not cost the user the answer
            log.exception("request %s: could not record the session turn", env.request_id)

    async def deliver(self, reply: Reply, reply_to: str | None, client: str | None = None, *, store: bool = True) -> None:
        """Store the Reply under `<client>.<request id>`, then send it to the client's inbox.

        The store is a create: only the first finisher wins. A later finisher finds the
        stored Reply: on a first delivery (a repeated request id, or a second finisher)
        it sends the stored one, so the client sees the same answer again and never a
        different one; on a redelivered last hop it sends nothing, since the first
        delivery sent it already. A reply address that is not exactly the client's inbox
        for this request is never written to (the router refuses such requests).
        """
        body = reply.model_dump_json().encode()
        client = client or subjects.client_of_inbox(reply_to) or subjects.ANONYMOUS
        if reply_to is not None and reply_to != subjects.reply_address(client, reply.request_id):
            log.warning("%s: not sending request %r's reply to %r: not the client's inbox", self.runtime.service, reply.request_id[:130], reply_to[:200])
            reply_to = None
        valid = subjects.valid_request_id(reply.request_id) and subjects.valid_client_id(client)  # a hostile id is answered, not stored
        if valid and self.finished is not None:
            self.finished.note(client, reply.request_id)  # sent a moment later, with others
        if store and valid:
            key = subjects.result_key(client, reply.request_id)
            results = await self.runtime.kv(subjects.RESULTS_BUCKET)
            try:
                await results.create(key, body)
            except KeyWrongLastSequenceError:
                message = current_message_or_none()
                if message is not None and message.reply and message.metadata.num_delivered > 1:
                    return  # a redelivered last hop: its first delivery sent the Reply
                with suppress(NotFoundError):
                    body = (await results.get(key)).value or body
        if reply_to:
            await self.runtime.publish(reply_to, body, {subjects.H_REQUEST_ID: reply.request_id})

    async def resend_stored(self, client: str, request_id: str, reply_to: str | None) -> bool:
        """Send the Reply stored for this request again (a repeated request id); False if none is stored yet."""
        results = await self.runtime.kv(subjects.RESULTS_BUCKET)
        try:
            body = (await results.get(subjects.result_key(client, request_id))).value
        except NotFoundError:
            return False
        if body and reply_to:
            await self.runtime.publish(reply_to, body, {subjects.H_REQUEST_ID: request_id})
        return bool(body)

    async def reply_error(self, request_id: str, reply_to: str | None, error: Error, client: str | None = None, *, store: bool = True) -> None:
        span = trace.get_current_span()
        reply = error_reply(request_id, error, trace_id=telemetry.trace_id_of(span))
        telemetry.record_reply(span, reply)
        metrics.observe_reply(reply)
        await self.deliver(reply, reply_to, client, store=store)
