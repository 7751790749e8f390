"""An agent step built with LangGraph, run as a step of the mesh.

A small graph of plain Python nodes: `draft` answers from the passages the retriever
found with Baton's offline model (shared/local_model.py), `review` checks the draft
cites a passage, and sends it back for one wider draft when it does not. The graph is
the agent; Baton gives it a consumer, retries, budgets, the deadline, spans and the
fallback.

    # config.yaml
    steps:
      agent: {service: agent}
    routes:
      agentic:
        steps: [guard.input, retrieve, guard.retrieval, {agent: {max_drafts: 2}}, guard.output]

    baton serve examples/agent_step.py      # once per replica
"""

from __future__ import annotations

from typing import TypedDict

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field

from shared.local_model import LocalExtractive
from shared.schema import Passage
from shared.steps import StepInput, StepOutput, step


class AgentParams(BaseModel):
    max_drafts: int = Field(default=2, ge=1, le=5)
    sentences: int = Field(default=2, ge=1, le=8)


class State(TypedDict):
    question: str
    passages: list[Passage]
    sentences: int
    drafts: int
    max_drafts: int
    answer: str
    citations: list[int]


model = LocalExtractive()


def draft(state: State) -> dict:
    """Answer from the passages; each new draft may use one more sentence."""
    generation = model.generate(state["question"], state["passages"], max_sentences=state["sentences"] + state["drafts"])
    return {"answer": generation.text, "citations": generation.citations, "drafts": state["drafts"] + 1}


def review(state: State) -> str:
    """Good enough when it cites a passage, or when there is nothing more to try."""
    if state["citations"] or not state["passages"] or state["drafts"] >= state["max_drafts"]:
        return "done"
    return "again"


def build_graph():
    graph = StateGraph(State)
    graph.add_node("draft", draft)
    graph.add_edge(START, "draft")
    graph.add_conditional_edges("draft", review, {"again": "draft", "done": END})
    return graph.compile()


agent_graph = build_graph()


@step("agent", params=AgentParams)
def agent(data: StepInput, params: AgentParams) -> StepOutput:
    """A LangGraph agent: drafts an answer from the passages and reviews its citations."""
    start: State = {
        "question": data.question, "passages": data.passages, "sentences": params.sentences,
        "drafts": 0, "max_drafts": params.max_drafts, "answer": "", "citations": [],
    }
    final = agent_graph.invoke(start)
    return StepOutput(answer=final["answer"], citations=final["citations"], note={"agent": "langgraph", "drafts": final["drafts"]})
