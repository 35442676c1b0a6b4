"""The task API against its OpenAPI document: real requests to a real worker, each request
and each answer checked by openapi-core against /api/v1/openapi.json as the worker serves it."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from tests.harness import Pipeline, PipelineFactory, eventually

pytestmark = pytest.mark.slow

TOKEN = "api-test-token"


class Checked:
    """An HTTP client whose every exchange must match the document."""

    def __init__(self, client: httpx.AsyncClient, spec: OpenAPI) -> None:
        self._client = client
        self._spec = spec
        self.operations: set[tuple[str, str, int]] = set()

    async def call(
        self, method: str, path: str, pattern: str, body: Any = None, **params: str
    ) -> httpx.Response:
        response = await self._client.request(
            method,
            path,
            json=body,
            params=params or None,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        url = urlsplit(str(response.request.url))
        request = MockRequest(
            f"{url.scheme}://{url.netloc}",
            method,
            url.path,
            path_pattern=pattern,
            args=params,
            view_args=_path_args(pattern, url.path),
            headers=dict(response.request.headers),
            data=response.request.content,
            content_type=response.request.headers.get("content-type", ""),
        )
        answer = MockResponse(
            response.content,
            status_code=response.status_code,
            headers=dict(response.headers),
            content_type=response.headers.get("content-type", "").split(";")[0],
        )
        if response.status_code != 400:
            # A 400 answers a request the document may refuse too: only its answer counts.
            self._spec.validate_request(request)
        self._spec.validate_response(request, answer)
        self.operations.add((method, pattern, response.status_code))
        return response


def _path_args(pattern: str, path: str) -> dict[str, str]:
    return {
        name[1:-1]: value
        for name, value in zip(pattern.split("/"), path.split("/"), strict=True)
        if name.startswith("{")
    }


@pytest.fixture
async def api_pipeline(pipeline_factory: PipelineFactory) -> Pipeline:
    return pipeline_factory(
        tasks_enabled=True,
        task_processor_modules="tests.tasks.processors",
        task_retry_delays_ms="200",
        task_max_attempts="2",
        web_auth_token=TOKEN,
    )


async def test_the_task_api_matches_its_openapi_document(api_pipeline: Pipeline) -> None:
    worker = await api_pipeline.start_worker("worker")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{worker.port}", timeout=10) as client:
        served = await client.get(
            "/api/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert served.status_code == 200
        spec = OpenAPI.from_dict(served.json())  # validates the document itself first
        api = Checked(client, spec)
        tasks, one = "/api/v1/tasks", "/api/v1/tasks/{task_id}"

        made = await api.call("POST", tasks, tasks, {"task_type": "counted", "priority": "high"})
        assert made.status_code == 201
        task_id = made.json()["task_id"]
        key = {"task_type": "counted", "idempotency_key": "k-1"}
        first = await api.call("POST", tasks, tasks, key)
        again = await api.call("POST", tasks, tasks, key)
        assert again.status_code == 200 and again.json()["duplicate_of"] == first.json()["task_id"]
        clash = await api.call("POST", tasks, tasks, {"task_id": task_id, "task_type": "counted"})
        assert clash.status_code == 409
        unknown = await api.call("POST", tasks, tasks, {"task_type": "no-such-type"})
        assert unknown.status_code == 400 and unknown.json()["field"] == "task_type"

        batch = await api.call(
            "POST",
            "/api/v1/tasks/batch",
            "/api/v1/tasks/batch",
            {"tasks": [{"task_type": "counted"}, {"task_type": "counted", "max_attempts": -1}]},
        )
        results = batch.json()["results"]
        assert results[0]["state"] == "queued" and results[1]["field"] == "max_attempts"

        # stats_report's payload is checked at submit; left out, the period is the last
        # whole one (STATS_REPORT_INTERVAL_SECONDS, an hour here), stored filled in.
        report = await api.call("POST", tasks, tasks, {"task_type": "stats_report", "payload": {}})
        assert report.status_code == 201, report.json()
        stored = await api.call("GET", f"{tasks}/{report.json()['task_id']}", one)
        end = int(time.time() * 1000) // 3_600_000 * 3_600_000
        assert stored.json()["payload"] in (
            {"period_start": end - 3_600_000, "period_end": end},
            {"period_start": end - 7_200_000, "period_end": end - 3_600_000},  # an hour turned
        ), stored.json()
        for payload, says in [
            ({"period_start": 1_796_310_000_000, "period_end": 1_796_306_400_000}, "after"),
            ({"period_end": "yesterday"}, "integer"),
        ]:
            refused = await api.call(
                "POST", tasks, tasks, {"task_type": "stats_report", "payload": payload}
            )
            assert refused.status_code == 400, refused.json()
            assert refused.json()["field"] == "payload.period_end", refused.json()
            assert says in refused.json()["error"], refused.json()
        typed = await api.call(
            "POST",
            "/api/v1/tasks/batch",
            "/api/v1/tasks/batch",
            {
                "tasks": [
                    {"task_type": "typed", "payload": {"n": 2}},
                    {"task_type": "typed", "payload": {"n": 2, "label": 5}},
                    {"task_type": "stats_report", "payload": {"period_start": -1}},
                    {"task_type": "counted", "payload": "anything: counted declares none"},
                ]
            },
        )
        outcomes = typed.json()["results"]
        assert [r.get("state") for r in outcomes] == ["queued", None, None, "queued"], outcomes
        assert outcomes[1]["field"] == "payload.label", outcomes
        assert outcomes[2]["field"] == "payload.period_start", outcomes
        assert outcomes[1]["error"].startswith("payload.label: "), outcomes
        # The document shows each type's payload, from the declaration submit checks.
        schemas = served.json()["components"]["schemas"]
        assert set(schemas["Payload.stats_report"]["properties"]) == {
            "period_start",
            "period_end",
        }
        assert schemas["Payload.typed"]["required"] == ["n"]
        mapping = schemas["TaskSubmit"]["discriminator"]["mapping"]
        assert mapping["typed"] == "#/components/schemas/TaskSubmit.typed"
        assert mapping["counted"] == "#/components/schemas/TaskSubmit.any"

        async def succeeded() -> bool:
            got = await api.call("GET", f"{tasks}/{task_id}", one)
            return bool(got.json()["state"] == "succeeded")

        await eventually(succeeded, 30, "the task to succeed")
        missing = await api.call("GET", f"{tasks}/nobody", one)
        assert missing.status_code == 404 and missing.json()["field"] == "task_id"
        listed = await api.call("GET", tasks, tasks, status="succeeded", limit="10")
        assert task_id in {t["task_id"] for t in listed.json()["tasks"]}
        bad = await api.call("GET", tasks, tasks, status="sleeping")
        assert bad.status_code == 400 and bad.json()["field"] == "status"

        slow = await api.call(
            "POST", tasks, tasks, {"task_type": "slow", "payload": {"seconds": 30}}
        )
        slow_id = slow.json()["task_id"]

        async def running() -> bool:
            got = await api.call("GET", f"{tasks}/{slow_id}", one)
            return bool(got.json()["state"] == "running")

        await eventually(running, 30, "the slow task to run")
        stopping = await api.call("DELETE", f"{tasks}/{slow_id}", one)
        assert stopping.status_code == 202 and stopping.json()["cancel_requested"] is True
        refused = await api.call("DELETE", f"{tasks}/{task_id}", one)
        assert refused.status_code == 409

        dead = await api.call("POST", tasks, tasks, {"task_type": "always_fails"})
        dead_id = dead.json()["task_id"]

        async def is_dead() -> bool:
            got = await api.call("GET", f"{tasks}/{dead_id}", one)
            return bool(got.json()["state"] == "dead")

        await eventually(is_dead, 30, "the failing task to be dead")
        retry = "/api/v1/tasks/{task_id}/retry"
        not_failed = await api.call("POST", f"{tasks}/{task_id}/retry", retry)
        assert not_failed.status_code == 409
        replay = await api.call(
            "POST", "/api/v1/tasks/dlq/replay", "/api/v1/tasks/dlq/replay", {"task_ids": [dead_id]}
        )
        assert replay.json()["replayed"] == [dead_id]
        await eventually(is_dead, 30, "the replayed task to die again")
        retried = await api.call("POST", f"{tasks}/{dead_id}/retry", retry)
        assert retried.status_code == 202

        workers = await api.call("GET", "/api/v1/stats/workers", "/api/v1/stats/workers")
        (entry,) = workers.json()["workers"]
        assert "task_normal" in entry["stages"] and entry["tasks"]["concurrency"] > 0

        by_topic: dict[str, Any] = {}

        async def drained() -> bool:
            nonlocal by_topic
            queues = await api.call("GET", "/api/v1/stats/queues", "/api/v1/stats/queues")
            by_topic = {q["topic"]: q for q in queues.json()["queues"]}
            # Submitted through the API: straight to the lanes, never the intake topic.
            normal = by_topic[f"{api_pipeline.env['APP_ID']}-tasks-normal"]
            return bool(normal["depth"] >= 5 and normal["lag"] == 0)

        try:
            await eventually(drained, 30, "the normal lane's lag to reach 0")
        finally:
            print(by_topic)
        assert by_topic[api_pipeline.env["TOPIC_TASKS"]]["depth"] == 0

        async def reported() -> bool:
            hourly = await api.call(
                "GET", "/api/v1/stats/hourly", "/api/v1/stats/hourly", limit="10"
            )
            return bool(hourly.json()["reports"])

        await eventually(reported, 30, "a stats report")
        bad = await api.call("GET", "/api/v1/stats/hourly", "/api/v1/stats/hourly", limit="0")
        assert bad.status_code == 400 and bad.json()["field"] == "limit"

        unauthorised = await client.get(tasks)
        assert unauthorised.status_code == 401
    covered = {(m, pattern) for m, pattern, _ in api.operations}
    documented = {
        (method.upper(), path)
        for path, item in served.json()["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented <= covered, documented - covered
