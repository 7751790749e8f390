"""retriever: BM25 search over the ingested corpora; passages travel on the envelope."""

from services.retriever.index import IndexMissingError, Retriever
from shared.mesh import Mesh
from shared.run import StartupError
from shared.schema import Envelope, Event, StepRecord

mesh = Mesh("retriever")
retriever: Retriever | None = None  # loaded on start, not at import


@mesh.before_consuming
async def load_index() -> None:
    global retriever
    try:
        retriever = Retriever.load(mesh.settings.index_dir)
    except IndexMissingError as exc:
        raise StartupError(str(exc)) from exc


@mesh.step_handler
async def retrieve(env: Envelope, record: StepRecord) -> None:
    """Run the retrieve step at the envelope's cursor; passages join the context."""
    assert retriever is not None, "the index is loaded on start"
    retriever.reload_if_changed()  # a re-ingest is picked up without a restart
    params = env.current.params
    top_k = int(params.get("top_k", (await mesh.config_for(env)).retrieval.default_top_k))
    passages = retriever.search(search_query(env), top_k=top_k, corpora=params.get("corpora"))
    env.context.passages = passages
    env.events.append(
        Event(
            kind="retrieval",
            step=env.current.name,
            data={"count": len(passages), "top_score": round(passages[0].score, 4) if passages else 0.0, "corpora": params.get("corpora") or retriever.corpora},
        )
    )


FOLLOW_UP_WORDS = 8


def search_query(env: Envelope) -> str:
    """A short follow-up ("and for gravel tyres?") is searched with the previous question."""
    question = env.context.question
    previous = next((turn.content for turn in reversed(env.context.history) if turn.role == "user"), None)
    if previous and len(question.split()) < FOLLOW_UP_WORDS:
        return f"{previous} {question}"
    return question


if __name__ == "__main__":
    from shared.run import run

    run("retriever")
