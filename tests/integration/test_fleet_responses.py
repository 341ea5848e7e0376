"""Stored responses of the Responses API in a fleet, in process: vLLM (with
VLLM_ENABLE_RESPONSES_API_STORE=1) keeps each response in the memory of the engine that made
it, so retrieving it, cancelling it or continuing from it (`previous_response_id`) works only
there; any other engine answers 404. What a user of the fleet notices: those calls succeed
whichever engine made the response, as they do on one vLLM."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from .conftest import serving
from .test_fleet_routing import MODEL, FakeEngine, Fleet, fleet_app, refuse

_ids = itertools.count()


def not_found(response_id: str) -> httpx.Response:
    return httpx.Response(
        404,
        json={
            "error": {
                "message": f"Response with id '{response_id}' not found.",
                "type": "invalid_request_error",
                "param": None,
                "code": 404,
            }
        },
    )


@dataclass
class StoringEngine(FakeEngine):
    """An engine that stores the responses it makes, as vLLM with its store on."""

    store: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # "METHOD path" of each responses call

    def make(self, body: dict[str, Any]) -> dict[str, Any]:
        response = {
            "id": f"resp_{self.name}{next(_ids)}",
            "object": "response",
            "model": self.model,
            "status": "completed",
            "previous_response_id": body.get("previous_response_id"),
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
        }
        self.store[response["id"]] = response
        return response

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if not path.startswith("/v1/responses"):
            return await super().handle(request)
        self.calls.append(f"{request.method} {path}")
        body = json.loads(request.content) if request.content else {}
        if path == "/v1/responses":
            previous = body.get("previous_response_id")
            if previous is not None and previous not in self.store:
                return not_found(previous)
            response = self.make(body)
            if body.get("stream"):
                created = {"type": "response.created", "sequence_number": 0, "response": response}
                done = {"type": "response.completed", "sequence_number": 1, "response": response}
                events = [
                    f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()
                    for e in (created, done)
                ]
                return httpx.Response(
                    200, headers={"content-type": "text/event-stream"}, content=b"".join(events)
                )
            return httpx.Response(200, json=response)
        response_id = path.removeprefix("/v1/responses/").removesuffix("/cancel")
        if response_id not in self.store:
            return not_found(response_id)
        if path.endswith("/cancel"):
            return httpx.Response(400, json={"error": {"message": "Cannot cancel a synchronous "
                                                      "response.", "code": 400}})  # fmt: skip
        return httpx.Response(200, json=self.store[response_id])


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    """Two engines that store their responses, taking new requests in turn."""
    engines = [StoringEngine("r0", MODEL), StoringEngine("r1", MODEL)]
    app = fleet_app(list(engines), policy="round_robin")
    async with serving(app, timeout=10) as http:
        yield Fleet(list(engines), http, app)


async def create(fleet: Fleet, **extra: Any) -> dict[str, Any]:
    r = await fleet.http.post("/v1/responses", json={"model": MODEL, "input": "hi", **extra})
    assert r.status_code == 200, r.text
    return r.json()


async def test_each_response_is_retrieved_from_the_engine_that_made_it(fleet):
    made = [await create(fleet) for _ in range(4)]
    assert {r["id"][5:7] for r in made} == {"r0", "r1"}  # made on both engines
    for _ in range(2):
        for response in made:
            r = await fleet.http.get(f"/v1/responses/{response['id']}")
            assert r.status_code == 200, r.text
            assert r.json()["id"] == response["id"]
    # Each retrieval went straight to the engine that made it: no engine was asked in vain.
    for engine in fleet.engines.values():
        assert all(
            call.endswith(tuple(engine.store)) for call in engine.calls if call.startswith("GET")
        ), engine.calls
    assert await fleet.metric("tide_vllm_routing_decisions_total", engine="r0", reason="stored")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_continuation_goes_to_the_engine_that_stored_its_previous_response(fleet, stream):
    first = await create(fleet)
    home = first["id"][5:7]
    previous = first["id"]
    for _ in range(4):  # round robin would alternate: each turn follows its previous one
        body = {"model": MODEL, "input": "and then?", "previous_response_id": previous}
        r = await fleet.http.post("/v1/responses", json={**body, "stream": stream})
        assert r.status_code == 200, r.text
        if stream:
            created = json.loads(r.text.split("data: ", 1)[1].split("\n", 1)[0])
            previous = created["response"]["id"]
        else:
            previous = r.json()["id"]
        assert previous.startswith(f"resp_{home}")
    other = "r1" if home == "r0" else "r0"
    assert fleet[other].calls == [], "the other engine was never asked"


async def test_a_response_made_elsewhere_is_found_on_the_engine_that_has_it(fleet):
    # Another gateway (or web worker, or this one before a restart) made it on r1.
    made = fleet["r1"].make({})
    for _ in range(3):  # whichever engine is asked first
        r = await fleet.http.get(f"/v1/responses/{made['id']}")
        assert r.status_code == 200, r.text
    r = await fleet.http.post(f"/v1/responses/{made['id']}/cancel")
    assert r.status_code == 400 and "Cannot cancel" in r.text  # r1's own answer
    # Once found, it is known: the later calls went to r1 alone.
    assert fleet["r0"].calls.count(f"GET /v1/responses/{made['id']}") <= 1


async def test_a_response_no_engine_has_is_vllms_404(fleet):
    r = await fleet.http.get("/v1/responses/resp_nobody")
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "Response with id 'resp_nobody' not found."
    assert all(e.calls == ["GET /v1/responses/resp_nobody"] for e in fleet.engines.values())
    body = {"model": MODEL, "input": "hi", "previous_response_id": "resp_nobody"}
    r = await fleet.http.post("/v1/responses", json=body)
    assert r.status_code == 404 and "resp_nobody" in r.text


async def test_an_engine_that_cannot_be_reached_is_passed_over(fleet):
    made = fleet["r1"].make({})
    fleet["r0"].behaviour = refuse
    r = await fleet.http.get(f"/v1/responses/{made['id']}")
    assert r.status_code == 200, r.text


async def test_a_draining_engine_still_answers_for_the_responses_it_stored(fleet):
    made = await create(fleet)
    home = made["id"][5:7]
    r = await fleet.http.post(f"/admin/engines/{home}/drain")
    assert r.status_code == 200, r.text
    r = await fleet.http.get(f"/v1/responses/{made['id']}")
    assert r.status_code == 200, r.text
    new = await create(fleet)  # a new response goes elsewhere
    assert not new["id"].startswith(f"resp_{home}")
